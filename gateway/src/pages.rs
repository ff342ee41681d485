//! The small pages a person sees behind an unsubscribe link.

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head>\
         <body style=\"font-family:sans-serif;max-width:32em;margin:3em auto\"><h1>{title}</h1>{body}</body></html>"
    )
}

fn escape(s: &str) -> String {
    html_escape::encode_safe(s).into_owned()
}

/// The button posts back to the address the page came from (whatever
/// prefix a proxy puts before /u/), so the token never leaves its URL.
pub fn confirm() -> String {
    page(
        "Unsubscribe",
        "<p>Stop receiving these emails?</p><form method=\"post\" action=\"\">\
         <button type=\"submit\">Unsubscribe</button></form>",
    )
}

pub fn done(topic: &str) -> String {
    let what = if topic == "all" {
        "any emails".to_owned()
    } else {
        format!("emails about {}", escape(topic))
    };
    page(
        "Unsubscribed",
        &format!("<p>You will not receive {what} from us any more.</p>"),
    )
}

pub fn refused(why: &str) -> String {
    page(
        "This link does not work",
        &format!(
            "<p>{}</p><p>Use the link in the latest email, or reply to it.</p>",
            escape(why)
        ),
    )
}

pub fn unavailable() -> String {
    page(
        "Please try again",
        "<p>We could not record this just now. Please try again in a minute.</p>",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn nothing_from_the_request_is_markup() {
        for p in [
            super::done("\"><script>x</script>"),
            super::refused("<script>x</script>"),
        ] {
            assert!(!p.contains("<script>"), "{p}");
        }
    }
}
