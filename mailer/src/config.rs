//! Settings from `--flag value` (or `--flag=value`) or the environment.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: Tls,
    pub smtp_user: Option<String>,
    pub smtp_password: Option<String>,
    pub from: String,
    pub batch: i32,
    pub lease: Duration,
    pub concurrency: usize,
    pub consumer: String,
    pub poll: Duration,
    /// Messages per second per worker thread; 0 = as fast as the server takes them.
    pub rate: f64,
    /// Drain what is claimable, then exit.
    pub once: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tls {
    None,
    StartTls,
    Wrapper,
}

pub const USAGE: &str = "nudge-mailer: delivers pg_nudge's outbox over SMTP

  --database-url URL   NUDGE_DATABASE_URL   (default host=127.0.0.1 user=postgres)
  --smtp-host HOST     NUDGE_SMTP_HOST      (default 127.0.0.1)
  --smtp-port PORT     NUDGE_SMTP_PORT      (default 25)
  --smtp-tls MODE      NUDGE_SMTP_TLS       none | starttls | tls (default none)
  --smtp-user USER     NUDGE_SMTP_USER
  --smtp-password PW   NUDGE_SMTP_PASSWORD
  --from ADDRESS       NUDGE_FROM           (default pg_nudge <nudge@localhost>)
  --batch N            NUDGE_BATCH          messages per claim (default 10)
  --lease SECONDS      NUDGE_LEASE          (default 300)
  --concurrency N      NUDGE_CONCURRENCY    worker threads (default 1)
  --consumer NAME      NUDGE_CONSUMER       (default nudge-mailer-PID)
  --poll-ms MS         NUDGE_POLL_MS        poll when no NOTIFY arrives (default 5000)
  --rate N             NUDGE_RATE           messages per second per thread, 0 = unlimited
  --once                                    drain what is claimable, then exit
";

impl Config {
    pub fn from_args(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut flags = std::collections::HashMap::new();
        let mut once = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}\n\n{USAGE}"));
            };
            if name == "once" {
                once = true;
                continue;
            }
            if name == "help" {
                return Err(USAGE.to_string());
            }
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (
                    name.to_string(),
                    it.next()
                        .ok_or_else(|| format!("--{name} needs a value"))?
                        .clone(),
                ),
            };
            flags.insert(name, value);
        }
        let get = |flag: &str, var: &str| flags.get(flag).cloned().or_else(|| env(var));
        let num = |flag: &str, var: &str, default: f64| -> Result<f64, String> {
            get(flag, var).map_or(Ok(default), |v| {
                v.parse::<f64>()
                    .map_err(|_| format!("--{flag}: not a number: {v:?}"))
            })
        };
        let known = [
            "database-url",
            "smtp-host",
            "smtp-port",
            "smtp-tls",
            "smtp-user",
            "smtp-password",
            "from",
            "batch",
            "lease",
            "concurrency",
            "consumer",
            "poll-ms",
            "rate",
        ];
        if let Some(bad) = flags.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown flag --{bad}\n\n{USAGE}"));
        }
        Ok(Config {
            database_url: get("database-url", "NUDGE_DATABASE_URL")
                .unwrap_or_else(|| "host=127.0.0.1 user=postgres".into()),
            smtp_host: get("smtp-host", "NUDGE_SMTP_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            smtp_port: num("smtp-port", "NUDGE_SMTP_PORT", 25.0)? as u16,
            smtp_tls: match get("smtp-tls", "NUDGE_SMTP_TLS").as_deref() {
                None | Some("none") => Tls::None,
                Some("starttls") => Tls::StartTls,
                Some("tls") => Tls::Wrapper,
                Some(other) => {
                    return Err(format!(
                        "--smtp-tls: expected none, starttls or tls, got {other:?}"
                    ))
                }
            },
            smtp_user: get("smtp-user", "NUDGE_SMTP_USER"),
            smtp_password: get("smtp-password", "NUDGE_SMTP_PASSWORD"),
            from: get("from", "NUDGE_FROM").unwrap_or_else(|| "pg_nudge <nudge@localhost>".into()),
            batch: num("batch", "NUDGE_BATCH", 10.0)?.max(1.0) as i32,
            lease: Duration::from_secs_f64(num("lease", "NUDGE_LEASE", 300.0)?.max(1.0)),
            concurrency: num("concurrency", "NUDGE_CONCURRENCY", 1.0)?.max(1.0) as usize,
            consumer: get("consumer", "NUDGE_CONSUMER")
                .unwrap_or_else(|| format!("nudge-mailer-{}", std::process::id())),
            poll: Duration::from_millis(num("poll-ms", "NUDGE_POLL_MS", 5000.0)?.max(10.0) as u64),
            rate: num("rate", "NUDGE_RATE", 0.0)?.max(0.0),
            once,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_override_environment() {
        let env = |k: &str| (k == "NUDGE_SMTP_PORT").then(|| "2525".to_string());
        let c = Config::from_args(&args("--batch 50 --smtp-tls=starttls --once"), env).unwrap();
        assert_eq!(
            (c.batch, c.smtp_port, c.smtp_tls, c.once),
            (50, 2525, Tls::StartTls, true)
        );
        let c = Config::from_args(&args("--smtp-port 26"), env).unwrap();
        assert_eq!(c.smtp_port, 26);
    }

    #[test]
    fn mistakes_are_named() {
        let none = |_: &str| None;
        assert!(Config::from_args(&args("--bach 5"), none)
            .unwrap_err()
            .starts_with("unknown flag --bach"));
        assert!(Config::from_args(&args("--batch x"), none)
            .unwrap_err()
            .contains("--batch: not a number"));
        assert!(Config::from_args(&args("--smtp-tls ssl"), none)
            .unwrap_err()
            .contains("expected none, starttls or tls"));
        assert!(Config::from_args(&args("--lease"), none)
            .unwrap_err()
            .contains("--lease needs a value"));
    }
}
