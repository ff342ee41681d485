//! Sender identity of a trigger: `from`, `reply_to` and extra `headers` in
//! its definition, checked when it is defined so that a mailer never meets
//! a header it cannot write (or one that would inject another).

use std::collections::BTreeMap;

/// Headers pg_nudge or the mailer own: a definition may not set them.
const RESERVED: &[&str] = &[
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "x-nudge-message-key",
    "return-path",
    "from",
    "reply-to",
    // the envelope sender: bounces would go elsewhere than the provider reports
    "sender",
    // provider instructions: SendGrid's can add recipients, SES's reroute events
    "x-smtpapi",
    "x-ses-configuration-set",
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sender {
    pub from: Option<String>,
    pub reply_to: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Sender {
    pub fn parse(
        from: Option<&str>,
        reply_to: Option<&str>,
        headers: &BTreeMap<String, String>,
    ) -> Result<Sender, String> {
        let from = from.map(|a| mailbox("from", a)).transpose()?;
        let reply_to = reply_to.map(|a| mailbox("reply_to", a)).transpose()?;
        let mut out = Vec::new();
        for (name, value) in headers {
            let path = format!("headers.{name}");
            let field_name =
                !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
            if !field_name || name.len() > 76 {
                return Err(format!(
                    "{path}: a header name is printable ASCII without spaces or ':', at most 76 characters"
                ));
            }
            if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "{path}: pg_nudge sets this header itself{}",
                    match name.to_ascii_lowercase().as_str() {
                        "from" => " (use the key \"from\")",
                        "reply-to" => " (use the key \"reply_to\")",
                        _ => "",
                    }
                ));
            }
            one_line(&path, value)?;
            out.push((name.clone(), value.clone()));
        }
        Ok(Sender {
            from,
            reply_to,
            headers: out,
        })
    }

    /// What goes into the outbox row's `headers`.
    pub fn outbox_headers(&self) -> Vec<(String, String)> {
        let mut h = Vec::new();
        if let Some(f) = &self.from {
            h.push(("From".to_owned(), f.clone()));
        }
        if let Some(r) = &self.reply_to {
            h.push(("Reply-To".to_owned(), r.clone()));
        }
        h.extend(self.headers.iter().cloned());
        h
    }
}

fn one_line(path: &str, value: &str) -> Result<(), String> {
    if value.contains(['\r', '\n']) {
        return Err(format!("{path}: a header value is one line (no CR or LF)"));
    }
    if value.len() > 998 {
        return Err(format!(
            "{path}: {} bytes; a header line has at most 998",
            value.len()
        ));
    }
    Ok(())
}

/// `addr@host`, `Name <addr@host>` or `"Name, with: specials" <addr@host>`:
/// what a mailer's address parser takes (an unquoted name with `,:;()` is not).
fn mailbox(path: &str, text: &str) -> Result<String, String> {
    one_line(path, text)?;
    let t = text.trim();
    let addr = match (t.rfind('<'), t.ends_with('>')) {
        (Some(i), true) => {
            let name = t[..i].trim();
            let quoted = name.len() >= 2
                && name.starts_with('"')
                && name.ends_with('"')
                && !name[1..name.len() - 1].contains(['"', '\\']);
            if !quoted && name.contains(|c: char| "<>,:;()[]@\"\\".contains(c)) {
                return Err(format!(
                    "{path}: {text:?}: a display name with any of , : ; ( ) [ ] @ is written in quotes: \"Acme, Inc.\" <hello@acme.example>"
                ));
            }
            &t[i + 1..t.len() - 1]
        }
        (None, false) => t,
        _ => return Err(format!("{path}: {text:?} is not an address")),
    };
    let ok = match addr.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !addr.contains(|c: char| c.is_whitespace() || "<>,;\"".contains(c))
        }
        None => false,
    };
    if !ok {
        return Err(format!(
            "{path}: {text:?} is not an address (name@example.com, or Name <name@example.com>)"
        ));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn from_reply_to_and_headers() {
        let s = Sender::parse(
            Some("Trailhead <hello@shop.example>"),
            Some("care@shop.example"),
            &headers(&[("X-Campaign", "cart")]),
        )
        .unwrap();
        assert_eq!(
            s.outbox_headers(),
            vec![
                (
                    "From".to_owned(),
                    "Trailhead <hello@shop.example>".to_owned()
                ),
                ("Reply-To".to_owned(), "care@shop.example".to_owned()),
                ("X-Campaign".to_owned(), "cart".to_owned()),
            ]
        );
    }

    #[test]
    fn what_a_mailer_could_not_write_is_refused_by_name() {
        let e = |from: Option<&str>, h: &[(&str, &str)]| {
            Sender::parse(from, None, &headers(h)).unwrap_err()
        };
        assert!(e(Some("not an address"), &[]).starts_with("from: "));
        assert!(e(Some("a@b.example\r\nBcc: x@y.example"), &[]).contains("no CR or LF"));
        assert!(e(None, &[("X-A", "one\nBcc: x@y.example")]).starts_with("headers.X-A: "));
        assert!(e(None, &[("Bad Name", "x")]).contains("printable ASCII"));
        assert!(e(None, &[("subject", "x")]).contains("sets this header itself"));
        assert!(e(None, &[("From", "a@b.example")]).contains("use the key \"from\""));
        assert!(e(None, &[("Sender", "a@b.example")]).contains("sets this header itself"));
        assert!(e(None, &[("X-SMTPAPI", "{\"to\": [\"x@y.example\"]}")])
            .contains("sets this header itself"));
        assert!(e(Some("Acme, Inc. <a@acme.example>"), &[]).contains("written in quotes"));
        assert!(Sender::parse(
            Some("\"Acme, Inc.\" <a@acme.example>"),
            None,
            &BTreeMap::new()
        )
        .is_ok());
    }
}
