//! Tokens pg_nudge signs and later takes back (one-click unsubscribe, open
//! and click tracking): `payload.mac`, both base64url, the payload the
//! fields joined by U+001F, the mac an HMAC-SHA256 under a key that only the
//! extension's owner reads. Each use signs under a key of its own
//! ([`derive`]) so that a token made for one never passes for another.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

fn mac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// A key for one use of the secret, named by `label`.
pub fn derive(secret: &[u8], label: &str) -> Vec<u8> {
    let mut m = mac(secret);
    m.update(label.as_bytes());
    m.finalize().into_bytes().to_vec()
}

pub fn sign(key: &[u8], fields: &[&str]) -> String {
    let payload = fields.join("\u{1f}");
    let mut m = mac(key);
    m.update(payload.as_bytes());
    format!(
        "{}.{}",
        B64.encode(payload),
        B64.encode(m.finalize().into_bytes())
    )
}

/// The fields of a token whose mac is right (compared in constant time).
pub fn open(key: &[u8], token: &str) -> Option<Vec<String>> {
    let (payload, tag) = token.trim().split_once('.')?;
    let payload = B64.decode(payload).ok()?;
    let tag = B64.decode(tag).ok()?;
    let mut m = mac(key);
    m.update(&payload);
    m.verify_slice(&tag).ok()?;
    let text = String::from_utf8(payload).ok()?;
    Some(text.split('\u{1f}').map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_key_that_signed_opens() {
        let t = sign(b"k", &["a", "b"]);
        assert_eq!(open(b"k", &t), Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(open(b"other", &t), None);
        assert_eq!(open(&derive(b"k", "x"), &t), None);
        let (_, tag) = t.split_once('.').unwrap();
        assert_eq!(
            open(b"k", &format!("{}.{tag}", B64.encode("a\u{1f}c"))),
            None
        );
    }
}
