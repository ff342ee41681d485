//! Consent: topics a user unsubscribed from, and the one-click unsubscribe
//! token (RFC 8058) that a message's `List-Unsubscribe` link carries.
//!
//! A token is `payload.mac`, both base64url: the payload is the message key,
//! the user and the topic; the mac an HMAC-SHA256 of it under the database's
//! secret (`nudge.secrets`, readable by the extension's owner only). Whoever
//! holds a message's link may unsubscribe its recipient from its topic, and
//! nobody can make a link for another user or topic.

use std::collections::{HashMap, HashSet};

/// The topic of a definition that names none.
pub const DEFAULT_TOPIC: &str = "marketing";
/// Unsubscribed from it: from every topic (transactional mail still goes).
pub const ALL_TOPICS: &str = "all";

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    pub message_key: String,
    pub user_id: String,
    pub topic: String,
}

pub fn token(secret: &[u8], message_key: &str, user_id: &str, topic: &str) -> String {
    crate::signed::sign(secret, &[message_key, user_id, topic])
}

/// The token's content when its mac is right.
pub fn verify(secret: &[u8], token: &str) -> Result<Unsubscribe, String> {
    match crate::signed::open(secret, token).as_deref() {
        Some([k, u, t]) => Ok(Unsubscribe {
            message_key: k.clone(),
            user_id: u.clone(),
            topic: t.clone(),
        }),
        _ => Err("invalid unsubscribe token".to_string()),
    }
}

/// The link a message carries, when a base URL is configured.
pub fn unsubscribe_url(base: &str, token: &str) -> String {
    format!("{}/u/{token}", base.trim_end_matches('/'))
}

/// The unsubscribe headers of a message (RFC 2369, RFC 8058) and the link
/// templates see as `unsubscribe_url`, for the configured link and mailto.
pub fn headers(
    url: Option<&str>,
    mailto: Option<&str>,
    token: &str,
) -> (Vec<(&'static str, String)>, Option<String>) {
    let link = url.map(|u| unsubscribe_url(u, token));
    let mut targets = vec![];
    if let Some(l) = &link {
        targets.push(format!("<{l}>"));
    }
    if let Some(m) = mailto {
        targets.push(format!("<mailto:{m}?subject=unsubscribe%20{token}>"));
    }
    let mut out = vec![];
    if !targets.is_empty() {
        out.push(("List-Unsubscribe", targets.join(", ")));
    }
    // one-click needs the https link: a POST to it unsubscribes
    if link.is_some() {
        out.push((
            "List-Unsubscribe-Post",
            "List-Unsubscribe=One-Click".to_string(),
        ));
    }
    (out, link)
}

/// The topics each user of a batch unsubscribed from.
#[derive(Debug, Default)]
pub struct Consent(HashMap<String, HashSet<String>>);

impl Consent {
    pub fn unsubscribed(&mut self, user_id: &str, topic: &str) {
        self.0
            .entry(user_id.to_owned())
            .or_default()
            .insert(topic.to_owned());
    }

    /// Why a message of `topic` may not go to the user, if it may not.
    pub fn refuses(&self, user_id: &str, topic: &str) -> Option<String> {
        let topics = self.0.get(user_id)?;
        if topics.contains(ALL_TOPICS) {
            Some("unsubscribed from all topics".into())
        } else if topics.contains(topic) {
            Some(format!("unsubscribed from topic {topic}"))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;

    #[test]
    fn a_token_says_what_it_was_made_for_and_nothing_else_passes() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let t = token(secret, "nm_1", "u42", "marketing");
        let u = verify(secret, &t).unwrap();
        assert_eq!(
            (u.message_key.as_str(), u.user_id.as_str(), u.topic.as_str()),
            ("nm_1", "u42", "marketing")
        );
        // another secret, an altered payload, an altered mac, garbage
        assert!(verify(b"another secret", &t).is_err());
        let (p, m) = t.split_once('.').unwrap();
        let other = B64.encode("nm_1\u{1f}u43\u{1f}marketing");
        assert!(verify(secret, &format!("{other}.{m}")).is_err());
        let mut flipped = m.to_string();
        flipped.replace_range(0..1, if m.starts_with('A') { "B" } else { "A" });
        assert!(verify(secret, &format!("{p}.{flipped}")).is_err());
        for junk in ["", ".", "abc", "a.b.c", "%%%.%%%"] {
            assert!(verify(secret, junk).is_err(), "{junk}");
        }
        assert_eq!(
            unsubscribe_url("https://x.example/", &t),
            format!("https://x.example/u/{t}")
        );
    }

    #[test]
    fn headers_follow_rfc_8058() {
        let (h, link) = headers(Some("https://g.example"), Some("unsub@shop.example"), "T");
        assert_eq!(link.as_deref(), Some("https://g.example/u/T"));
        assert_eq!(
            h,
            vec![
                (
                    "List-Unsubscribe",
                    "<https://g.example/u/T>, <mailto:unsub@shop.example?subject=unsubscribe%20T>"
                        .to_string()
                ),
                (
                    "List-Unsubscribe-Post",
                    "List-Unsubscribe=One-Click".to_string()
                ),
            ]
        );
        // a mailto alone is no one-click
        let (h, link) = headers(None, Some("u@x.example"), "T");
        assert!(link.is_none() && h.len() == 1);
        assert!(headers(None, None, "T").0.is_empty());
    }

    #[test]
    fn consent_is_per_topic_or_for_all() {
        let mut c = Consent::default();
        c.unsubscribed("u1", "newsletter");
        c.unsubscribed("u2", ALL_TOPICS);
        assert!(c.refuses("u1", "newsletter").is_some());
        assert!(c.refuses("u1", "marketing").is_none());
        assert!(c.refuses("u2", "marketing").is_some());
        assert!(c.refuses("u3", "marketing").is_none());
    }
}
