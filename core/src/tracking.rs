//! Open and click tracking: a message's html gets a pixel and its links are
//! rewritten to the gateway (`<base>/o/<token>`, `<base>/c/<token>`). A
//! token is signed like an unsubscribe token but under a key of its own, so
//! that neither passes for the other, and a click token carries its URL: the
//! gateway redirects only to what pg_nudge signed, so it is no open redirect.

use crate::signed;
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

/// Tracking tokens are signed under a key of their own: an unsubscribe
/// token never passes for one, nor the reverse.
fn key(secret: &[u8]) -> Vec<u8> {
    signed::derive(secret, "pg_nudge link tracking v1")
}

pub fn open_token(secret: &[u8], message_key: &str) -> String {
    signed::sign(&key(secret), &["o", message_key])
}

pub fn click_token(secret: &[u8], message_key: &str, url: &str) -> String {
    signed::sign(&key(secret), &["c", message_key, url])
}

/// What a token says when its mac is right.
pub fn verify(secret: &[u8], token: &str) -> Result<Link, String> {
    match signed::open(&key(secret), token).as_deref() {
        Some([o, key]) if o == "o" => Ok(Link::Open {
            message_key: key.clone(),
        }),
        Some([c, key, url]) if c == "c" => Ok(Link::Click {
            message_key: key.clone(),
            url: url.clone(),
        }),
        _ => Err("invalid tracking token".to_string()),
    }
}

/// `scheme://host[:port]`, lower-cased, of an absolute http(s) URL.
fn origin(url: &str) -> Option<String> {
    let lower = url.trim().to_ascii_lowercase();
    let (scheme, rest) = match lower.strip_prefix("https://") {
        Some(rest) => ("https", rest),
        None => ("http", lower.strip_prefix("http://")?),
    };
    let host = &rest[..rest.find(|c: char| "/?#".contains(c)).unwrap_or(rest.len())];
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "\"'<>{}@\\".contains(c)) {
        return None;
    }
    Some(format!("{scheme}://{host}"))
}

/// The origins the template's author wrote: `https://shop.example` in
/// `href="https://shop.example/cart/{{ event.cart_id }}"`. Only links to
/// these are tracked, so that a URL that came from data (an event's prop)
/// never gets a signed redirect: that would make the gateway an open
/// redirect for whoever can send an event.
pub fn author_origins(template_html: &str) -> Vec<String> {
    let lower = template_html.to_ascii_lowercase();
    let mut out: Vec<String> = ["http://", "https://"]
        .iter()
        .flat_map(|scheme| {
            lower
                .match_indices(scheme)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        })
        .filter_map(|i| {
            let tail = &lower[i..];
            let end = tail
                .find(|c: char| c.is_whitespace() || "\"'<>".contains(c))
                .unwrap_or(tail.len());
            origin(&tail[..end])
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What decides which links are rewritten, besides the trigger's `track`.
pub struct Rewrite<'a> {
    /// The gateway's address.
    pub base: &'a str,
    pub secret: &'a [u8],
    pub message_key: &'a str,
    /// [`author_origins`] of the template that rendered the message.
    pub origins: &'a [String],
    /// The message's one-click unsubscribe link: it stays one click.
    pub unsubscribe: Option<&'a str>,
}

/// The html with the links the author wrote pointed at `<base>/c/…` and a
/// pixel at the end of its body, as `t` asks.
pub fn rewrite(html: &str, r: &Rewrite<'_>, t: Tracking) -> Result<String, String> {
    if !t.any() {
        return Ok(html.to_owned());
    }
    let (secret, message_key) = (r.secret, r.message_key);
    let base = r.base.trim_end_matches('/');
    let pixel = format!(
        r#"<img src="{}/o/{}" width="1" height="1" alt="" style="display:none">"#,
        html_escape::encode_double_quoted_attribute(base),
        open_token(secret, message_key)
    );
    let body_seen = Cell::new(false);
    let mut handlers = vec![];
    if t.clicks {
        handlers.push(lol_html::element!("a[href]", |el| {
            let raw = el.get_attribute("href").unwrap_or_default();
            let url = html_escape::decode_html_entities(&raw).trim().to_owned();
            let authored = origin(&url).is_some_and(|o| r.origins.contains(&o));
            let unsubscribe = r.unsubscribe.is_some_and(|u| u.trim() == url);
            if authored && !unsubscribe {
                let link = format!("{base}/c/{}", click_token(secret, message_key, &url));
                el.set_attribute("href", &html_escape::encode_double_quoted_attribute(&link))?;
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
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;

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

    fn r<'a>(origins: &'a [String], unsubscribe: Option<&'a str>) -> Rewrite<'a> {
        Rewrite {
            base: BASE,
            secret: b"k",
            message_key: "nm_1",
            origins,
            unsubscribe,
        }
    }

    #[test]
    fn links_point_at_the_gateway_and_carry_their_url() {
        let html = r#"<html><body><p><a href="https://shop.example/cart?a=1&amp;b=2">cart</a>
            <a href="mailto:care@shop.example">mail</a> <a href=" https://unsub.example/u/TOKEN">unsubscribe</a></p></body></html>"#;
        let origins = author_origins(
            r#"<a href="https://shop.example/cart?a={{ a }}&amp;b=2"> <a href="{{ unsubscribe_url }}">"#,
        );
        assert_eq!(origins, vec!["https://shop.example".to_owned()]);
        let out = rewrite(
            html,
            &r(&origins, Some("https://unsub.example/u/TOKEN")),
            BOTH,
        )
        .unwrap();
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
            out.contains("mailto:care@shop.example")
                && out.contains(" https://unsub.example/u/TOKEN"),
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
        let opens = Tracking {
            opens: true,
            clicks: false,
        };
        let out = rewrite("<p>hi</p>", &r(&[], None), opens).unwrap();
        assert!(
            out.starts_with("<p>hi</p><img src=\"https://gw.example/o/"),
            "{out}"
        );
        let x = vec!["https://x".to_owned()];
        let untracked = rewrite(
            "<a href=\"https://x\">x</a>",
            &r(&x, None),
            Tracking::default(),
        )
        .unwrap();
        assert_eq!(untracked, "<a href=\"https://x\">x</a>");
    }

    #[test]
    fn a_link_that_came_from_data_gets_no_signed_redirect() {
        // the template: href="{{ event.product_url }}"; the event: an attacker's URL
        let origins = author_origins(
            r#"<a href="{{ event.product_url }}">see</a> <a href="https://shop.example/">shop</a>"#,
        );
        let html = r#"<a href="https://evil.example/x">see</a> <a href="https://shop.example.evil.example/">x</a> <a href="javascript:alert(1)">j</a>"#;
        let out = rewrite(html, &r(&origins, None), BOTH).unwrap();
        assert!(!out.contains("/c/"), "{out}");
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
