//! Email providers' reports of what happened to a message, each checked
//! against the provider's signature before it is read, and turned into
//! `nudge.record_webhook` calls. The message is found by the key nudge-mailer
//! puts in its headers (docs/gateway.md, "Webhooks").

pub mod mailgun;
pub mod postmark;
pub mod sendgrid;
pub mod ses;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// `record_engagement`'s kinds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Delivered,
    Opened,
    Clicked,
    Bounced,
    Complained,
    Unsubscribed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Opened => "opened",
            Kind::Clicked => "clicked",
            Kind::Bounced => "bounced",
            Kind::Complained => "complained",
            Kind::Unsubscribed => "unsubscribed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The provider's id for this report: a redelivery carries the same one.
    pub id: String,
    pub message_key: String,
    pub kind: Kind,
    pub at: Option<DateTime<Utc>>,
    /// `type: soft` keeps a bounce off the suppression list; `url` for clicks.
    pub meta: Map<String, Value>,
    /// A value the provider signs once per request (Mailgun's token): a
    /// second request with it is a replay even under another report id.
    pub nonce: Option<String>,
}

/// Why a webhook request is refused.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// Not configured here: 404, so that a probe learns nothing more.
    NotConfigured,
    /// The signature (or the credentials) did not verify: 401.
    Unsigned(String),
    /// Signed, but not something we read: 400.
    Invalid(String),
}

/// The header (or variable) that carries pg_nudge's message key.
pub const KEY_FIELD: &str = "nudge_message_key";

/// Constant-time comparison of two secrets' bytes.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn parse_json(body: &[u8]) -> Result<Value, Refused> {
    serde_json::from_slice(body).map_err(|e| Refused::Invalid(format!("body: not JSON: {e}")))
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// A signed timestamp (seconds since 1970) must be recent: a signature
/// captured once cannot be replayed later under new ids.
pub fn fresh(ts: &str, max_age: std::time::Duration, now: DateTime<Utc>) -> Result<(), Refused> {
    let secs = ts
        .trim()
        .parse::<f64>()
        .map_err(|_| Refused::Unsigned(format!("timestamp: {ts:?} is not seconds since 1970")))?;
    let age = now.timestamp() as f64 - secs;
    if age.abs() > max_age.as_secs_f64() {
        return Err(Refused::Unsigned(format!(
            "timestamp: {ts} is {:.0} s from now; at most {} s are taken (--webhook-max-age)",
            age.abs(),
            max_age.as_secs()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_or_future_timestamp_is_refused() {
        let now = Utc::now();
        let max = std::time::Duration::from_secs(900);
        assert!(fresh(&now.timestamp().to_string(), max, now).is_ok());
        assert!(fresh(&(now.timestamp() - 901).to_string(), max, now).is_err());
        assert!(fresh(&(now.timestamp() + 901).to_string(), max, now).is_err());
        assert!(fresh("soon", max, now).is_err());
    }
}
