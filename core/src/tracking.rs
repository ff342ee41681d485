//! Open and click tracking: a message's html gets a pixel and its links are
//! rewritten to the gateway (`<base>/o/<token>`, `<base>/c/<token>`). A
//! token is signed like an unsubscribe token but under a key of its own, so
//! that neither passes for the other, and a click token carries its URL: the
//! gateway redirects only to what pg_nudge signed, so it is no open redirect.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::cell::Cell;

/// A definition's `"track": {"opens": true, "clicks": true}`; off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracking {
    #[serde(default)]
    pub opens: bool,
    #[serde(default)]
    pub clicks: bool,
}

impl Tracking {
    pub fn any(self) -> bool {
        self.opens || self.clicks
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Open { message_key: String },
    Click { message_key: String, url: String },
}

fn keyed(secret: &[u8]) -> Hmac<Sha256> {
    let mut derive = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    derive.update(b"pg_nudge link tracking v1");
    let key = derive.finalize().into_bytes();
    <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("any key length")
}

fn sign(secret: &[u8], fields: &[&str]) -> String {
    let payload = fields.join("\u{1f}");
    let mut m = keyed(secret);
    m.update(payload.as_bytes());
    format!(
        "{}.{}",
        B64.encode(payload),
        B64.encode(m.finalize().into_bytes())
    )
}

pub fn open_token(secret: &[u8], message_key: &str) -> String {
    sign(secret, &["o", message_key])
}

pub fn click_token(secret: &[u8], message_key: &str, url: &str) -> String {
    sign(secret, &["c", message_key, url])
}

/// What a token says when its mac is right (compared in constant time).
pub fn verify(secret: &[u8], token: &str) -> Result<Link, String> {
    let bad = || "invalid tracking token".to_string();
    let (payload, tag) = token.trim().split_once('.').ok_or_else(bad)?;
    let payload = B64.decode(payload).map_err(|_| bad())?;
    let tag = B64.decode(tag).map_err(|_| bad())?;
    let mut m = keyed(secret);
    m.update(&payload);
    m.verify_slice(&tag).map_err(|_| bad())?;
    let text = String::from_utf8(payload).map_err(|_| bad())?;
    let parts: Vec<&str> = text.split('\u{1f}').collect();
    match parts.as_slice() {
        ["o", key] => Ok(Link::Open {
            message_key: (*key).to_owned(),
        }),
        ["c", key, url] => Ok(Link::Click {
            message_key: (*key).to_owned(),
            url: (*url).to_owned(),
        }),
        _ => Err(bad()),
    }
}

/// The characters an attribute value may hold encoded (templates escape
/// `&` in what they output).
fn attribute_text(raw: &str) -> String {
    raw.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The html with its http(s) links pointed at `<base>/c/…` (not the
/// unsubscribe link, which must stay one click) and a pixel at the end of
/// its body, as `t` asks.
pub fn rewrite(
    html: &str,
    base: &str,
    secret: &[u8],
    message_key: &str,
    t: Tracking,
) -> Result<String, String> {
    if !t.any() {
        return Ok(html.to_owned());
    }
    let base = base.trim_end_matches('/');
    let unsubscribe = format!("{base}/u/");
    let pixel = format!(
        r#"<img src="{base}/o/{}" width="1" height="1" alt="" style="display:none">"#,
        open_token(secret, message_key)
    );
    let body_seen = Cell::new(false);
    let mut handlers = vec![];
    if t.clicks {
        handlers.push(lol_html::element!("a[href]", |el| {
            let href = attribute_text(&el.get_attribute("href").unwrap_or_default());
            let lower = href.trim_start().to_ascii_lowercase();
            if (lower.starts_with("https://") || lower.starts_with("http://"))
                && !href.starts_with(&unsubscribe)
            {
                let url = href.trim().to_owned();
                el.set_attribute(
                    "href",
                    &format!("{base}/c/{}", click_token(secret, message_key, &url)),
                )?;
            }
            Ok(())
        }));
    }
    if t.opens {
        handlers.push(lol_html::element!("body", |el| {
            body_seen.set(true);
            el.append(&pixel, lol_html::html_content::ContentType::Html);
            Ok(())
        }));
    }
    let mut out = lol_html::rewrite_str(
        html,
        lol_html::RewriteStrSettings {
            element_content_handlers: handlers,
            ..lol_html::RewriteStrSettings::new()
        },
    )
    .map_err(|e| format!("tracking: the html part could not be rewritten: {e}"))?;
    if t.opens && !body_seen.get() {
        out.push_str(&pixel);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://gw.example";
    const BOTH: Tracking = Tracking {
        opens: true,
        clicks: true,
    };

    fn tokens(html: &str, path: &str) -> Vec<String> {
        html.split(&format!("{BASE}/{path}/"))
            .skip(1)
            .map(|s| s.split('"').next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn links_point_at_the_gateway_and_carry_their_url() {
        let html = r#"<html><body><p><a href="https://shop.example/cart?a=1&amp;b=2">cart</a>
            <a href="mailto:care@shop.example">mail</a> <a href="https://gw.example/u/TOKEN">unsubscribe</a></p></body></html>"#;
        let out = rewrite(html, BASE, b"k", "nm_1", BOTH).unwrap();
        let clicks = tokens(&out, "c");
        assert_eq!(clicks.len(), 1, "{out}");
        assert_eq!(
            verify(b"k", &clicks[0]).unwrap(),
            Link::Click {
                message_key: "nm_1".into(),
                url: "https://shop.example/cart?a=1&b=2".into()
            }
        );
        assert!(
            out.contains("mailto:care@shop.example") && out.contains("https://gw.example/u/TOKEN"),
            "{out}"
        );
        let opens = tokens(&out, "o");
        assert_eq!(
            verify(b"k", &opens[0]).unwrap(),
            Link::Open {
                message_key: "nm_1".into()
            }
        );
        assert!(
            out.find("/o/").unwrap() < out.find("</body>").unwrap(),
            "{out}"
        );
    }

    #[test]
    fn a_fragment_gets_its_pixel_at_the_end_and_nothing_changes_untracked() {
        let out = rewrite(
            "<p>hi</p>",
            BASE,
            b"k",
            "nm_1",
            Tracking {
                opens: true,
                clicks: false,
            },
        )
        .unwrap();
        assert!(
            out.starts_with("<p>hi</p><img src=\"https://gw.example/o/"),
            "{out}"
        );
        assert_eq!(
            rewrite(
                "<a href=\"https://x\">x</a>",
                BASE,
                b"k",
                "nm_1",
                Tracking::default()
            )
            .unwrap(),
            "<a href=\"https://x\">x</a>"
        );
    }

    #[test]
    fn a_changed_url_or_another_key_is_refused() {
        let t = click_token(b"k", "nm_1", "https://shop.example/");
        let (payload, tag) = t.split_once('.').unwrap();
        let other = B64.encode("c\u{1f}nm_1\u{1f}https://evil.example/");
        assert!(verify(b"k", &format!("{other}.{tag}")).is_err());
        assert!(verify(b"other", &t).is_err());
        assert!(verify(b"k", payload).is_err());
        // an unsubscribe token is not a tracking token, nor the reverse
        let unsub = crate::consent::token(b"k", "c", "nm_1", "https://evil.example/");
        assert!(verify(b"k", &unsub).is_err());
        assert!(crate::consent::verify(b"k", &t).is_err());
    }
}
