//! Postmark's webhooks. Postmark signs nothing: it sends the HTTP Basic
//! credentials written into the webhook's URL, and those are what is checked.
//! The message key comes back in `Metadata` (nudge-mailer sends
//! `X-PM-Metadata-nudge_message_key`).

use super::{parse_json, same, text, Kind, Refused, Report, KEY_FIELD};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub fn verify(
    credentials: Option<&str>,
    authorization: Option<&str>,
    body: &[u8],
) -> Result<Value, Refused> {
    let want = credentials.ok_or(Refused::NotConfigured)?;
    let given = authorization
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .ok_or_else(|| Refused::Unsigned("Authorization: Basic credentials are required".into()))?;
    if !same(want.as_bytes(), &given) {
        return Err(Refused::Unsigned("Authorization: wrong credentials".into()));
    }
    parse_json(body)
}

pub fn report(v: &Value) -> Result<Option<Report>, Refused> {
    let record =
        text(v, "/RecordType").ok_or_else(|| Refused::Invalid("RecordType: missing".into()))?;
    let message =
        text(v, "/MessageID").ok_or_else(|| Refused::Invalid("MessageID: missing".into()))?;
    let mut meta = Map::new();
    let (kind, when) = match record {
        "Delivery" => (Kind::Delivered, "/DeliveredAt"),
        "Open" => (Kind::Opened, "/ReceivedAt"),
        "Click" => {
            if let Some(url) = v.get("OriginalLink") {
                meta.insert("url".into(), url.clone());
            }
            (Kind::Clicked, "/ReceivedAt")
        }
        "Bounce" => {
            // the permanent types; the others (SoftBounce, Transient, ...) may pass later
            if !matches!(
                text(v, "/Type"),
                Some("HardBounce" | "BadEmailAddress" | "ManuallyDeactivated")
            ) {
                meta.insert("type".into(), "soft".into());
            }
            (Kind::Bounced, "/BouncedAt")
        }
        "SpamComplaint" => (Kind::Complained, "/BouncedAt"),
        "SubscriptionChange" if v.get("SuppressSending") == Some(&Value::Bool(true)) => {
            (Kind::Unsubscribed, "/ChangedAt")
        }
        _ => return Ok(None),
    };
    let Some(key) = text(v, &format!("/Metadata/{KEY_FIELD}")) else {
        return Ok(None);
    };
    // a bounce has an ID of its own; a message is delivered once, but opened,
    // clicked (per link) and resubscribed many times: those carry their time
    let id = match v.get("ID") {
        Some(Value::Number(n)) => format!("{record}:{n}"),
        _ if kind == Kind::Delivered => format!("{record}:{message}"),
        _ => format!(
            "{record}:{message}:{}:{}",
            text(v, when).unwrap_or_default(),
            text(v, "/OriginalLink").unwrap_or_default()
        ),
    };
    Ok(Some(Report {
        id,
        message_key: key.to_owned(),
        kind,
        at: text(v, when)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        meta,
        nonce: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_then_records() {
        let body = serde_json::to_vec(&json!({"RecordType": "Bounce", "Type": "SoftBounce", "ID": 42,
            "MessageID": "pm-1", "BouncedAt": "2026-01-01T10:00:00Z", "Metadata": {"nudge_message_key": "nm_1"}}))
        .unwrap();
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("hook:s3cret")
        );
        let v = verify(Some("hook:s3cret"), Some(&auth), &body).unwrap();
        let r = report(&v).unwrap().unwrap();
        assert_eq!((r.kind, r.id.as_str()), (Kind::Bounced, "Bounce:42"));
        assert_eq!(r.meta.get("type"), Some(&json!("soft")));
        assert!(matches!(
            verify(Some("hook:other"), Some(&auth), &body),
            Err(Refused::Unsigned(_))
        ));
        assert!(matches!(
            verify(Some("hook:s3cret"), None, &body),
            Err(Refused::Unsigned(_))
        ));
    }
}
