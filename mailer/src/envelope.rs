//! An outbox row as an email: Message-ID from message_key, the row's headers
//! applied, a text alternative when the template has one.

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{MultiPart, SinglePart};
use lettre::Message;

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
    // Providers' ways of handing a value back in their webhooks, so that
    // nudge-gateway finds the message a report is about (docs/gateway.md).
    // A server that knows none of them ignores them.
    for (name, value) in provider_headers(&row.message_key) {
        b = b.raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(name),
            value,
        ));
    }
    if let Some(headers) = row.headers.as_object() {
        for (name, value) in headers {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            if name.eq_ignore_ascii_case("message-id") {
                b = b.message_id(Some(value));
                continue;
            }
            let name = HeaderName::new_from_ascii(name.clone())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            b = b.raw_header(HeaderValue::new(name, value));
        }
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

/// The key as SendGrid (a unique argument), Mailgun (a user variable),
/// Postmark (metadata) and SES (a message tag) carry it back. Keys are
/// `nm_` and hex, so they need no quoting in any of these.
fn provider_headers(key: &str) -> [(&'static str, String); 4] {
    [
        (
            "X-SMTPAPI",
            format!(r#"{{"unique_args":{{"nudge_message_key":"{key}"}}}}"#),
        ),
        (
            "X-Mailgun-Variables",
            format!(r#"{{"nudge_message_key":"{key}"}}"#),
        ),
        ("X-PM-Metadata-nudge_message_key", key.to_owned()),
        ("X-SES-MESSAGE-TAGS", format!("nudge_message_key={key}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn a_bad_address_is_an_error() {
        let mut r = row();
        r.recipient = "not an address".into();
        assert!(build(&r, "shop@example.com")
            .unwrap_err()
            .starts_with("recipient"));
    }
}
