//! Settings from `--flag value` (or `--flag=value`) or the environment, as
//! nudge-mailer takes them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub listen: String,
    pub database_url: String,
    pub pool_size: usize,
    /// Keys an ingestion request may carry: Segment's write key, Amplitude's
    /// api_key, Mixpanel's project token.
    pub write_keys: HashSet<String>,
    /// Keys that ship inside browsers and apps (a Segment browser write key,
    /// a Mixpanel project token): anyone can read them, so they may send
    /// events but not change a profile (an address would redirect mail).
    pub public_keys: HashSet<String>,
    /// How old a signed webhook's timestamp may be (SendGrid, Mailgun): an
    /// older one is a replay, whatever its ids.
    pub webhook_max_age: std::time::Duration,
    pub max_body: usize,
    pub max_event: usize,
    pub max_events: usize,
    pub sendgrid_public_key: Option<String>,
    pub mailgun_signing_key: Option<String>,
    /// `user:password` a Postmark webhook URL carries (Postmark signs nothing).
    pub postmark_credentials: Option<String>,
    /// Folder of the PEM certificates SNS signs with, named as the file in
    /// their SigningCertURL (nothing here fetches them).
    pub sns_certs: Option<PathBuf>,
    /// Topic ARNs whose notifications are taken; empty takes any.
    pub sns_topics: HashSet<String>,
}

pub const USAGE: &str = "nudge-gateway: the HTTP edge of pg_nudge (docs/gateway.md)

  --listen ADDR              NUDGE_LISTEN               (default 127.0.0.1:8080)
  --database-url URL         NUDGE_DATABASE_URL         (default host=127.0.0.1 user=postgres)
  --pool-size N              NUDGE_POOL_SIZE            database connections (default 8)
  --write-keys K1,K2         NUDGE_WRITE_KEYS           server-side keys (Segment write keys, Amplitude
                                                        api keys, Mixpanel tokens/secrets): events, profiles
  --public-keys K1,K2        NUDGE_PUBLIC_KEYS          keys shipped in browsers and apps: events only
  --max-body BYTES           NUDGE_MAX_BODY             per request (default 1048576)
  --max-event BYTES          NUDGE_MAX_EVENT            per event (default 32768)
  --max-events N             NUDGE_MAX_EVENTS           per request (default 2000)
  --sendgrid-public-key KEY  NUDGE_SENDGRID_PUBLIC_KEY  the Event Webhook's verification key (base64)
  --mailgun-signing-key KEY  NUDGE_MAILGUN_SIGNING_KEY  the HTTP webhook signing key
  --postmark-credentials U:P NUDGE_POSTMARK_CREDENTIALS basic auth the Postmark webhook URL carries
  --sns-certs DIR            NUDGE_SNS_CERTS            PEM certificates SNS signs with
  --sns-topics ARN1,ARN2     NUDGE_SNS_TOPICS           the topics whose notifications are taken
                                                        (required with --sns-certs)
  --webhook-max-age SECONDS  NUDGE_WEBHOOK_MAX_AGE      oldest signed SendGrid/Mailgun timestamp taken
                                                        (default 900)
";

impl Config {
    pub fn from_args(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut flags = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--help" || a == "-h" {
                return Err(USAGE.to_owned());
            }
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}\n\n{USAGE}"));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    name.to_owned(),
                    it.next()
                        .ok_or_else(|| format!("--{name} needs a value"))?
                        .clone(),
                ),
            };
            if !KNOWN.contains(&name.as_str()) {
                return Err(format!("unknown flag --{name}\n\n{USAGE}"));
            }
            flags.insert(name, value);
        }
        let get = |flag: &str| -> Option<String> {
            flags.get(flag).cloned().or_else(|| {
                env(&format!("NUDGE_{}", flag.to_uppercase().replace('-', "_")))
                    .filter(|v| !v.is_empty())
            })
        };
        let number = |flag: &str, default: usize| -> Result<usize, String> {
            get(flag).map_or(Ok(default), |v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--{flag}: {v:?} is not a positive number"))
            })
        };
        let list = |flag: &str| -> HashSet<String> {
            get(flag)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let listen = get("listen").unwrap_or_else(|| "127.0.0.1:8080".into());
        listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("--listen: {listen:?}: {e}"))?;
        let postmark_credentials = get("postmark-credentials");
        if let Some(c) = &postmark_credentials {
            if !c.contains(':') {
                return Err("--postmark-credentials: give user:password".into());
            }
        }
        let sns_certs = get("sns-certs").map(PathBuf::from);
        let sns_topics = list("sns-topics");
        // SNS signs what any AWS account publishes: only a topic of ours proves the sender
        if sns_certs.is_some() && sns_topics.is_empty() {
            return Err(
                "--sns-certs needs --sns-topics: any AWS account's topic is signed by SNS".into(),
            );
        }
        let write_keys = list("write-keys");
        let public_keys = list("public-keys");
        if let Some(k) = write_keys.intersection(&public_keys).next() {
            return Err(format!("{k:?} is in both --write-keys and --public-keys"));
        }
        Ok(Config {
            listen,
            database_url: get("database-url")
                .unwrap_or_else(|| "host=127.0.0.1 user=postgres".into()),
            pool_size: number("pool-size", 8)?,
            write_keys,
            public_keys,
            webhook_max_age: std::time::Duration::from_secs(number("webhook-max-age", 900)? as u64),
            max_body: number("max-body", 1 << 20)?,
            max_event: number("max-event", 32 << 10)?,
            max_events: number("max-events", 2000)?,
            sendgrid_public_key: get("sendgrid-public-key"),
            mailgun_signing_key: get("mailgun-signing-key"),
            postmark_credentials,
            sns_certs,
            sns_topics,
        })
    }
}

const KNOWN: &[&str] = &[
    "listen",
    "database-url",
    "pool-size",
    "write-keys",
    "public-keys",
    "webhook-max-age",
    "max-body",
    "max-event",
    "max-events",
    "sendgrid-public-key",
    "mailgun-signing-key",
    "postmark-credentials",
    "sns-certs",
    "sns-topics",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_win_over_the_environment() {
        let c = Config::from_args(&args(&["--write-keys=a, b", "--pool-size", "2"]), |k| {
            (k == "NUDGE_POOL_SIZE" || k == "NUDGE_MAX_EVENTS").then(|| "5".to_owned())
        })
        .unwrap();
        assert_eq!(c.pool_size, 2);
        assert_eq!(c.max_events, 5);
        assert_eq!(c.write_keys, ["a", "b"].map(String::from).into());
    }

    #[test]
    fn says_what_is_wrong() {
        let e = Config::from_args(&args(&["--pool-size", "0"]), |_| None).unwrap_err();
        assert!(e.contains("--pool-size"), "{e}");
        let e = Config::from_args(&args(&["--nope", "1"]), |_| None).unwrap_err();
        assert!(e.contains("unknown flag --nope"), "{e}");
        let e = Config::from_args(&args(&["--listen", "here"]), |_| None).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
        let e = Config::from_args(&args(&["--sns-certs", "/x"]), |_| None).unwrap_err();
        assert!(e.contains("--sns-topics"), "{e}");
        let e = Config::from_args(&args(&["--write-keys", "a", "--public-keys", "a"]), |_| {
            None
        })
        .unwrap_err();
        assert!(e.contains("both"), "{e}");
    }
}
