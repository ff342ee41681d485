//! Mailgun's webhooks: a JSON body whose `signature` object holds a
//! timestamp, a token and the hex HMAC-SHA256 of the two under the account's
//! webhook signing key. The message key comes back as a user variable
//! (nudge-mailer sends `X-Mailgun-Variables`).

use super::{parse_json, same, text, Kind, Refused, Report, KEY_FIELD};
use chrono::{TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

pub fn verify(
    key: Option<&str>,
    body: &[u8],
    max_age: std::time::Duration,
) -> Result<Value, Refused> {
    let key = key.ok_or(Refused::NotConfigured)?;
    let v = parse_json(body)?;
    let (Some(ts), Some(token), Some(sig)) = (
        text(&v, "/signature/timestamp"),
        text(&v, "/signature/token"),
        text(&v, "/signature/signature"),
    ) else {
        return Err(Refused::Unsigned(
            "signature: timestamp, token and signature are required".into(),
        ));
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(ts.as_bytes());
    mac.update(token.as_bytes());
    let want = hex::encode(mac.finalize().into_bytes());
    if !same(want.as_bytes(), sig.to_ascii_lowercase().as_bytes()) {
        return Err(Refused::Unsigned(
            "signature: does not match the signing key".into(),
        ));
    }
    // the signature covers the timestamp and token, not the event: a recent
    // timestamp and a token used once are what tie the event to this request
    super::fresh(ts, max_age, Utc::now())?;
    Ok(v)
}

/// The report in a verified body; `None` for events pg_nudge does not record
/// (accepted, a temporary failure) or mail that is not ours.
pub fn report(v: &Value) -> Result<Option<Report>, Refused> {
    let e = v
        .get("event-data")
        .ok_or_else(|| Refused::Invalid("event-data: missing".into()))?;
    let id = text(e, "/id").ok_or_else(|| Refused::Invalid("event-data.id: missing".into()))?;
    let mut meta = Map::new();
    let kind = match text(e, "/event").unwrap_or_default() {
        "delivered" => Kind::Delivered,
        "opened" => Kind::Opened,
        "clicked" => {
            if let Some(url) = e.get("url") {
                meta.insert("url".into(), url.clone());
            }
            Kind::Clicked
        }
        "failed" if text(e, "/severity") == Some("permanent") => Kind::Bounced,
        "complained" => Kind::Complained,
        "unsubscribed" => Kind::Unsubscribed,
        _ => return Ok(None),
    };
    let Some(key) = text(e, &format!("/user-variables/{KEY_FIELD}")) else {
        return Ok(None);
    };
    let at = e
        .get("timestamp")
        .and_then(Value::as_f64)
        .and_then(|s| Utc.timestamp_millis_opt((s * 1000.0) as i64).single());
    Ok(Some(Report {
        id: id.to_owned(),
        message_key: key.to_owned(),
        kind,
        at,
        meta,
        nonce: text(v, "/signature/token").map(str::to_owned),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: std::time::Duration = std::time::Duration::from_secs(900);

    fn signed_at(key: &str, ts: i64, event: Value) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{ts}tok").as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        serde_json::to_vec(
            &json!({"signature": {"timestamp": ts.to_string(), "token": "tok", "signature": sig},
                                   "event-data": event}),
        )
        .unwrap()
    }

    fn signed(key: &str, event: Value) -> Vec<u8> {
        signed_at(key, Utc::now().timestamp(), event)
    }

    #[test]
    fn verifies_then_reads() {
        let body = signed(
            "k",
            json!({"id": "e1", "event": "failed", "severity": "permanent",
                                      "timestamp": 1767261600.5, "user-variables": {"nudge_message_key": "nm_1"}}),
        );
        let v = verify(Some("k"), &body, MAX).unwrap();
        let r = report(&v).unwrap().unwrap();
        assert_eq!(
            (r.kind, r.message_key.as_str(), r.id.as_str()),
            (Kind::Bounced, "nm_1", "e1")
        );
        assert_eq!(r.nonce.as_deref(), Some("tok"));
        let stale = signed_at("k", Utc::now().timestamp() - 3600, json!({"id": "e1"}));
        assert!(matches!(
            verify(Some("k"), &stale, MAX),
            Err(Refused::Unsigned(_))
        ));
        assert!(matches!(
            verify(Some("other"), &body, MAX),
            Err(Refused::Unsigned(_))
        ));
        assert_eq!(
            verify(None, &body, MAX).unwrap_err(),
            Refused::NotConfigured
        );
        let temporary = signed(
            "k",
            json!({"id": "e2", "event": "failed", "severity": "temporary",
                                           "user-variables": {"nudge_message_key": "nm_1"}}),
        );
        assert_eq!(
            report(&verify(Some("k"), &temporary, MAX).unwrap()).unwrap(),
            None
        );
    }
}
