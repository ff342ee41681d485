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
