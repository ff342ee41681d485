//! Amazon SES event notifications delivered by SNS to an HTTP endpoint. SNS
//! signs each message with RSA (SHA1 for SignatureVersion 1, SHA256 for 2)
//! over its fields in a fixed order; the certificate is the one its
//! SigningCertURL names, which must be an SNS host, and is read from the
//! configured trust store, never fetched. The message key comes back as a
//! message tag (nudge-mailer sends `X-SES-MESSAGE-TAGS`) or in the headers.

use super::{parse_json, text, Kind, Refused, Report, KEY_FIELD};
use base64::Engine;
use chrono::{DateTime, Utc};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::RsaPublicKey;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The trust store: certificate file name (as the URL ends) to its key.
#[derive(Default)]
pub struct Certs(HashMap<String, RsaPublicKey>);

impl Certs {
    pub fn load(dir: &Path) -> Result<Certs, String> {
        let mut keys = HashMap::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("--sns-certs {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let key = public_key(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            keys.insert(entry.file_name().to_string_lossy().into_owned(), key);
        }
        Ok(Certs(keys))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

fn public_key(pem: &[u8]) -> Result<RsaPublicKey, String> {
    use x509_cert::der::{DecodePem, Encode};
    let cert =
        x509_cert::Certificate::from_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| e.to_string())?;
    RsaPublicKey::from_public_key_der(&spki).map_err(|e| format!("not an RSA key: {e}"))
}

/// An SNS message whose signature verified.
pub enum Sns {
    /// Confirming it subscribes this endpoint to the topic: visiting the URL
    /// is the operator's step (nothing here reaches the network).
    Confirm {
        topic: String,
        subscribe_url: String,
    },
    Notification {
        id: String,
        message: Value,
    },
    Other,
}

pub fn verify(
    certs: Option<&Certs>,
    topics: &HashSet<String>,
    body: &[u8],
) -> Result<Sns, Refused> {
    let certs = certs.ok_or(Refused::NotConfigured)?;
    let v = parse_json(body)?;
    let field = |k: &str| text(&v, &format!("/{k}"));
    let kind = field("Type").ok_or_else(|| Refused::Invalid("Type: missing".into()))?;
    let order: &[&str] = match kind {
        "Notification" => &[
            "Message",
            "MessageId",
            "Subject",
            "Timestamp",
            "TopicArn",
            "Type",
        ],
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => &[
            "Message",
            "MessageId",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        ],
        other => {
            return Err(Refused::Invalid(format!(
                "Type: {other:?} is not an SNS message type"
            )))
        }
    };
    let mut signed = String::new();
    for k in order {
        match field(k) {
            Some(value) => {
                signed.push_str(k);
                signed.push('\n');
                signed.push_str(value);
                signed.push('\n');
            }
            None if *k == "Subject" => {}
            None => {
                return Err(Refused::Unsigned(format!(
                    "{k}: missing, so the signature cannot be checked"
                )))
            }
        }
    }
    let key = cert_for(certs, field("SigningCertURL"))?;
    let sig = field("Signature")
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .and_then(|b| Signature::try_from(b.as_slice()).ok())
        .ok_or_else(|| Refused::Unsigned("Signature: missing or not base64".into()))?;
    let ok = match field("SignatureVersion") {
        Some("1") => VerifyingKey::<sha1::Sha1>::new(key.clone())
            .verify(signed.as_bytes(), &sig)
            .is_ok(),
        Some("2") => VerifyingKey::<sha2::Sha256>::new(key.clone())
            .verify(signed.as_bytes(), &sig)
            .is_ok(),
        other => {
            return Err(Refused::Unsigned(format!(
                "SignatureVersion: {other:?} is not 1 or 2"
            )))
        }
    };
    if !ok {
        return Err(Refused::Unsigned(
            "Signature: does not match the signing certificate".into(),
        ));
    }
    let topic = field("TopicArn").unwrap_or_default();
    if !topics.is_empty() && !topics.contains(topic) {
        return Err(Refused::Unsigned(format!(
            "TopicArn: {topic} is not a topic this gateway takes"
        )));
    }
    Ok(match kind {
        "SubscriptionConfirmation" => Sns::Confirm {
            topic: topic.to_owned(),
            subscribe_url: field("SubscribeURL").unwrap_or_default().to_owned(),
        },
        "Notification" => Sns::Notification {
            id: field("MessageId").unwrap_or_default().to_owned(),
            message: serde_json::from_str(field("Message").unwrap_or_default())
                .map_err(|e| Refused::Invalid(format!("Message: not an SES event: {e}")))?,
        },
        _ => Sns::Other,
    })
}

/// The certificate must come from an SNS host over https, and be in the store.
fn cert_for<'a>(certs: &'a Certs, url: Option<&str>) -> Result<&'a RsaPublicKey, Refused> {
    let url = url.ok_or_else(|| Refused::Unsigned("SigningCertURL: missing".into()))?;
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| Refused::Unsigned(format!("SigningCertURL: {url} is not https")))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let sns_host = host.starts_with("sns.")
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"))
        && host.split('.').count() >= 4;
    if !sns_host {
        return Err(Refused::Unsigned(format!(
            "SigningCertURL: {host} is not an SNS host"
        )));
    }
    let file = path.rsplit('/').next().unwrap_or_default();
    certs.0.get(file).ok_or_else(|| {
        Refused::Unsigned(format!("SigningCertURL: {file} is not in the trust store"))
    })
}

/// What an SES event reports (`eventType` for configuration-set events,
/// `notificationType` for identity notifications).
pub fn report(id: &str, message: &Value) -> Result<Option<Report>, Refused> {
    let kind_name = text(message, "/eventType")
        .or_else(|| text(message, "/notificationType"))
        .ok_or_else(|| Refused::Invalid("Message.eventType: missing".into()))?;
    let mut meta = Map::new();
    let (kind, when) = match kind_name {
        "Delivery" => (Kind::Delivered, "/delivery/timestamp"),
        "Open" => (Kind::Opened, "/open/timestamp"),
        "Click" => {
            if let Some(url) = message.pointer("/click/link") {
                meta.insert("url".into(), url.clone());
            }
            (Kind::Clicked, "/click/timestamp")
        }
        "Bounce" => {
            if text(message, "/bounce/bounceType") != Some("Permanent") {
                meta.insert("type".into(), "soft".into());
            }
            (Kind::Bounced, "/bounce/timestamp")
        }
        "Complaint" => (Kind::Complained, "/complaint/timestamp"),
        _ => return Ok(None),
    };
    let Some(key) = message_key(message) else {
        return Ok(None);
    };
    Ok(Some(Report {
        id: id.to_owned(),
        message_key: key,
        kind,
        at: text(message, when)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        meta,
        nonce: None,
    }))
}

fn message_key(message: &Value) -> Option<String> {
    if let Some(k) = text(message, &format!("/mail/tags/{KEY_FIELD}/0")) {
        return Some(k.to_owned());
    }
    message
        .pointer("/mail/headers")?
        .as_array()?
        .iter()
        .find(|h| text(h, "/name").is_some_and(|n| n.eq_ignore_ascii_case("X-Nudge-Message-Key")))
        .and_then(|h| text(h, "/value"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_comes_from_sns_and_the_store() {
        let certs = Certs::default();
        let e = |u: &str| match cert_for(&certs, Some(u)) {
            Err(Refused::Unsigned(m)) => m,
            _ => panic!("taken: {u}"),
        };
        assert!(e("http://sns.us-east-1.amazonaws.com/a.pem").contains("not https"));
        assert!(
            e("https://evil.example/sns.us-east-1.amazonaws.com/a.pem").contains("not an SNS host")
        );
        assert!(
            e("https://sns.us-east-1.amazonaws.com.evil.example/a.pem").contains("not an SNS host")
        );
        assert!(e("https://sns.us-east-1.amazonaws.com/a.pem").contains("not in the trust store"));
    }

    #[test]
    fn reads_the_key_from_a_tag_or_a_header() {
        let m: Value = serde_json::from_str(
            r#"{"eventType": "Bounce", "bounce": {"bounceType": "Transient", "timestamp": "2026-01-01T10:00:00Z"},
                "mail": {"headers": [{"name": "X-Nudge-Message-Key", "value": "nm_1"}]}}"#,
        )
        .unwrap();
        let r = report("sns-1", &m).unwrap().unwrap();
        assert_eq!((r.kind, r.message_key.as_str()), (Kind::Bounced, "nm_1"));
        assert_eq!(r.meta.get("type").and_then(Value::as_str), Some("soft"));
    }
}
