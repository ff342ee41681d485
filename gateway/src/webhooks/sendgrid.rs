//! SendGrid's signed Event Webhook: an ECDSA (P-256, SHA-256) signature of
//! the timestamp header followed by the raw body, checked with the
//! verification key SendGrid shows for the webhook (base64 DER). The message
//! key comes back as a custom argument (nudge-mailer sends `X-SMTPAPI`).

use super::{parse_json, text, Kind, Refused, Report, KEY_FIELD};
use base64::Engine;
use chrono::{TimeZone, Utc};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::{Map, Value};

pub const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// The configured key, read once at start: a key that does not parse stops
/// the gateway rather than refusing every webhook later.
pub fn key(base64_der: &str) -> Result<VerifyingKey, String> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(base64_der.trim())
        .map_err(|e| format!("--sendgrid-public-key: not base64: {e}"))?;
    VerifyingKey::from_public_key_der(&der)
        .map_err(|e| format!("--sendgrid-public-key: not a P-256 public key: {e}"))
}

pub fn verify(
    key: Option<&VerifyingKey>,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    max_age: std::time::Duration,
) -> Result<Value, Refused> {
    let key = key.ok_or(Refused::NotConfigured)?;
    let (Some(sig), Some(ts)) = (signature, timestamp) else {
        return Err(Refused::Unsigned(format!(
            "{SIGNATURE} and {TIMESTAMP} are required"
        )));
    };
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .ok()
        .and_then(|der| Signature::from_der(&der).ok())
        .ok_or_else(|| {
            Refused::Unsigned(format!("{SIGNATURE}: not a base64 DER ECDSA signature"))
        })?;
    let mut signed = ts.as_bytes().to_vec();
    signed.extend_from_slice(body);
    key.verify(&signed, &sig)
        .map_err(|_| Refused::Unsigned("signature: does not match the verification key".into()))?;
    super::fresh(ts, max_age, Utc::now())?;
    parse_json(body)
}

pub fn reports(v: &Value) -> Result<Vec<Report>, Refused> {
    let events = v
        .as_array()
        .ok_or_else(|| Refused::Invalid("body: should be an array of events".into()))?;
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut meta = Map::new();
        let kind = match text(e, "/event").unwrap_or_default() {
            "delivered" => Kind::Delivered,
            "open" => Kind::Opened,
            "click" => {
                if let Some(url) = e.get("url") {
                    meta.insert("url".into(), url.clone());
                }
                Kind::Clicked
            }
            "bounce" => {
                // "blocked" is a refusal that may pass later; "bounce" is permanent
                if text(e, "/type") == Some("blocked") {
                    meta.insert("type".into(), "soft".into());
                }
                Kind::Bounced
            }
            "spamreport" => Kind::Complained,
            "unsubscribe" | "group_unsubscribe" => Kind::Unsubscribed,
            _ => continue,
        };
        let Some(key) = text(e, &format!("/{KEY_FIELD}")) else {
            continue;
        };
        let id = text(e, "/sg_event_id")
            .ok_or_else(|| Refused::Invalid(format!("[{i}].sg_event_id: missing")))?;
        out.push(Report {
            id: id.to_owned(),
            message_key: key.to_owned(),
            kind,
            at: e
                .get("timestamp")
                .and_then(Value::as_i64)
                .and_then(|s| Utc.timestamp_opt(s, 0).single()),
            meta,
            nonce: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePublicKey;
    use serde_json::json;

    #[test]
    fn verifies_then_reads() {
        let signing = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let public = base64::engine::general_purpose::STANDARD.encode(
            signing
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes(),
        );
        let key = key(&public).unwrap();
        let body = serde_json::to_vec(&json!([
            {"event": "spamreport", "sg_event_id": "e1", "timestamp": 1767261600, "nudge_message_key": "nm_1"},
            {"event": "processed", "sg_event_id": "e2", "nudge_message_key": "nm_1"},
            {"event": "open", "sg_event_id": "e3"}
        ]))
        .unwrap();
        let max = std::time::Duration::from_secs(900);
        let now = Utc::now().timestamp().to_string();
        let later = (Utc::now().timestamp() + 1).to_string();
        let sign = |ts: &str| {
            let mut signed = ts.as_bytes().to_vec();
            signed.extend_from_slice(&body);
            let sig: Signature = signing.sign(&signed);
            base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
        };
        let sig = sign(&now);
        let v = verify(Some(&key), Some(&sig), Some(&now), &body, max).unwrap();
        let r = reports(&v).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].kind, r[0].id.as_str()), (Kind::Complained, "e1"));
        // another time, or another body, under the same signature
        assert!(matches!(
            verify(Some(&key), Some(&sig), Some(&later), &body, max),
            Err(Refused::Unsigned(_))
        ));
        assert!(matches!(
            verify(Some(&key), Some(&sig), Some(&now), b"[]", max),
            Err(Refused::Unsigned(_))
        ));
        // rightly signed, long ago
        let old = (Utc::now().timestamp() - 3600).to_string();
        assert!(matches!(
            verify(Some(&key), Some(&sign(&old)), Some(&old), &body, max),
            Err(Refused::Unsigned(_))
        ));
        assert!(key_fails("bm90IGEga2V5"));
    }

    fn key_fails(k: &str) -> bool {
        super::key(k).is_err()
    }
}
