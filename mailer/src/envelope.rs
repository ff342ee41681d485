//! An outbox row as an email: Message-ID from message_key, the row's headers
//! applied, a text alternative when the template has one.

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{MultiPart, SinglePart};
use lettre::Message;
use serde_json::{json, Value};

pub struct Row {
    pub id: i64,
    pub message_key: String,
    pub recipient: String,
    pub subject: String,
    pub html: String,
    pub text_body: Option<String>,
    pub headers: serde_json::Value,
}

/// Builds the email; an error here is permanent (retrying cannot fix it).
pub fn build(row: &Row, from: &str) -> Result<Message, String> {
    let row_headers = row.headers.as_object().cloned().unwrap_or_default();
    // a trigger's own sender (its "from"), else the mailer's
    let from_row = header(&row_headers, "From");
    let from = from_row.as_deref().unwrap_or(from);
    let mut b = Message::builder()
        .from(
            from.parse()
                .map_err(|e| format!("from address {from:?}: {e}"))?,
        )
        .to(row
            .recipient
            .parse()
            .map_err(|e| format!("recipient {:?}: {e}", row.recipient))?)
        .subject(row.subject.clone())
        .message_id(Some(format!("<{}@pg_nudge>", row.message_key)));
    // The provider-facing idempotency key: a retried send carries the same one.
    b = b.raw_header(HeaderValue::new(
        HeaderName::new_from_ascii_str("X-Nudge-Message-Key"),
        row.message_key.clone(),
    ));
    if let Some(r) = header(&row_headers, "Reply-To") {
        b = b.reply_to(
            r.parse()
                .map_err(|e| format!("reply-to address {r:?}: {e}"))?,
        );
    }
    // Providers' ways of handing a value back in their webhooks, so that
    // nudge-gateway finds the message a report is about (docs/gateway.md),
    // merged into the row's own header of the same name. A server that
    // knows none of them ignores them.
    let provider = provider_headers(&row.message_key, &row_headers);
    for (name, value) in &provider {
        b = b.raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(name),
            value.clone(),
        ));
    }
    for (name, value) in &row_headers {
        let value = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        if name.eq_ignore_ascii_case("message-id") {
            b = b.message_id(Some(value));
            continue;
        }
        if name.eq_ignore_ascii_case("from") || name.eq_ignore_ascii_case("reply-to") {
            continue;
        }
        if provider.iter().any(|(p, _)| p.eq_ignore_ascii_case(name)) {
            continue;
        }
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|e| format!("header {name:?}: {e}"))?;
        b = b.raw_header(HeaderValue::new(name, value));
    }
    let body = match &row.text_body {
        Some(text) => b.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            row.html.clone(),
        )),
        None => b.singlepart(SinglePart::html(row.html.clone())),
    };
    body.map_err(|e| format!("building the message: {e}"))
}

/// A row's header by name, whatever its case.
fn header(row: &serde_json::Map<String, Value>, name: &str) -> Option<String> {
    row.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
}

/// The key as SendGrid (a unique argument), Mailgun (a user variable),
/// Postmark (metadata) and SES (a message tag) carry it back, each merged
/// with what the row's headers (a template's) already put there: a header
/// set twice would keep only one of the two. Keys are `nm_` and hex, so
/// they need no quoting in any of these.
fn provider_headers(
    key: &str,
    row: &serde_json::Map<String, Value>,
) -> Vec<(&'static str, String)> {
    let given = |name: &str| header(row, name);
    // a JSON object header with our key added at `path`
    let json_with = |name: &str, path: &[&str]| {
        let mut v = given(name)
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        let mut at = &mut v;
        for p in path {
            if !at.get(*p).is_some_and(Value::is_object) {
                at[*p] = json!({});
            }
            at = &mut at[*p];
        }
        at["nudge_message_key"] = json!(key);
        v.to_string()
    };
    let tags = match given("X-SES-MESSAGE-TAGS") {
        Some(t) if !t.trim().is_empty() => format!("{t}, nudge_message_key={key}"),
        _ => format!("nudge_message_key={key}"),
    };
    vec![
        ("X-SMTPAPI", json_with("X-SMTPAPI", &["unique_args"])),
        ("X-Mailgun-Variables", json_with("X-Mailgun-Variables", &[])),
        ("X-PM-Metadata-nudge_message_key", key.to_owned()),
        ("X-SES-MESSAGE-TAGS", tags),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            id: 1,
            message_key: "nm_abc".into(),
            recipient: "ada@example.com".into(),
            subject: "Your cart".into(),
            html: "<p>hi</p>".into(),
            text_body: Some("hi".into()),
            headers: json!({"Message-ID": "<nm_abc@pg_nudge>", "List-Unsubscribe": "<https://x/u>"}),
        }
    }

    #[test]
    fn carries_the_key_and_headers() {
        let m = String::from_utf8(
            build(&row(), "Shop <shop@example.com>")
                .unwrap()
                .formatted(),
        )
        .unwrap();
        assert!(m.contains("Message-ID: <nm_abc@pg_nudge>"), "{m}");
        assert!(m.contains("X-Nudge-Message-Key: nm_abc"), "{m}");
        assert!(
            m.contains(r#"X-Mailgun-Variables: {"nudge_message_key":"nm_abc"}"#),
            "{m}"
        );
        assert!(
            m.contains("X-SES-MESSAGE-TAGS: nudge_message_key=nm_abc"),
            "{m}"
        );
        assert!(m.contains("List-Unsubscribe: <https://x/u>"), "{m}");
        assert!(m.contains("multipart/alternative"), "{m}");
    }

    #[test]
    fn a_templates_provider_headers_keep_what_they_had_and_gain_the_key() {
        let mut r = row();
        r.headers = json!({"X-SMTPAPI": r#"{"category": ["cart"], "unique_args": {"shop": "1"}}"#,
                           "x-ses-message-tags": "campaign=cart"});
        let m = String::from_utf8(build(&r, "shop@example.com").unwrap().formatted()).unwrap();
        let smtpapi = m.lines().find(|l| l.starts_with("X-SMTPAPI: ")).unwrap();
        let v: Value = serde_json::from_str(&smtpapi["X-SMTPAPI: ".len()..]).unwrap();
        assert_eq!(
            v,
            json!({"category": ["cart"], "unique_args": {"shop": "1", "nudge_message_key": "nm_abc"}})
        );
        assert!(
            m.contains("X-SES-MESSAGE-TAGS: campaign=cart, nudge_message_key=nm_abc"),
            "{m}"
        );
        assert_eq!(m.matches("X-SMTPAPI").count(), 1, "{m}");
    }

    #[test]
    fn a_triggers_sender_replaces_the_mailers() {
        let mut r = row();
        r.headers = json!({"From": "Trailhead <hello@shop.example>", "Reply-To": "care@shop.example", "X-Campaign": "cart"});
        let m = String::from_utf8(build(&r, "pg_nudge <nudge@localhost>").unwrap().formatted())
            .unwrap();
        assert!(m.contains("From: Trailhead <hello@shop.example>"), "{m}");
        assert!(m.contains("Reply-To: care@shop.example"), "{m}");
        assert!(m.contains("X-Campaign: cart"), "{m}");
        assert!(!m.contains("nudge@localhost"), "{m}");
    }

    #[test]
    fn a_bad_address_is_an_error() {
        let mut r = row();
        r.recipient = "not an address".into();
        assert!(build(&r, "shop@example.com")
            .unwrap_err()
            .starts_with("recipient"));
    }
}
