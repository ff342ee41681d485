//! HTML escaping: the source transform that makes every `{{ }}` of the html
//! part escape its value (at the places [`scan`](super::scan::scan) finds),
//! and the escaping `{% cycle %}` applies itself.

/// `source` with ` | escape_once` inserted at each offset of `at` (sorted).
pub(super) fn escape_outputs(source: &str, at: &[usize]) -> String {
    let mut out = String::with_capacity(source.len() + at.len() * 16);
    let mut last = 0;
    for &i in at {
        out.push_str(&source[last..i]);
        out.push_str(" | escape_once");
        last = i;
    }
    out.push_str(&source[last..]);
    out
}

/// liquid's `escape_once`: escapes `<>'"&`, leaving `&lt;`, `&gt;`, `&#39;`,
/// `&quot;` and `&amp;` as they are.
pub(super) fn html_escape_once(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['<', '>', '\'', '"', '&']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        rest = &rest[i + 1..];
        out.push_str(match c {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\'' => "&#39;",
            b'"' => "&quot;",
            _ if ["lt;", "gt;", "#39;", "quot;", "amp;"]
                .iter()
                .any(|e| rest.starts_with(e)) =>
            {
                "&"
            }
            _ => "&amp;",
        });
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::budget::{BudgetScope, Sink};
    use crate::render::lax::Lax;
    use crate::render::scan::scan;
    use crate::render::tests::html;
    use crate::render::{parser, Template};
    use serde_json::{json, Value as Json};
    use std::time::Duration;

    fn name() -> Json {
        json!({"event": {"name": "<b>\"Bo\" & 'Al'</b>", "items": ["<i>", "x"]}})
    }

    const NAME_ESCAPED: &str = "&lt;b&gt;&quot;Bo&quot; &amp; &#39;Al&#39;&lt;/b&gt;";

    #[test]
    fn html_escapes_interpolated_values() {
        assert_eq!(
            html("<p>{{ event.name }}</p>", name()).unwrap(),
            format!("<p>{NAME_ESCAPED}</p>")
        );
        assert_eq!(
            html(
                "<a title=\"{{event.name|upcase}}\">{{- event.name -}} </a>",
                name()
            )
            .unwrap(),
            "<a title=\"&lt;B&gt;&quot;BO&quot; &amp; &#39;AL&#39;&lt;/B&gt;\">&lt;b&gt;&quot;Bo&quot; &amp; &#39;Al&#39;&lt;/b&gt;</a>"
        );
        // values written in the template are escaped too; nil stays empty
        assert_eq!(
            html("{{ \"<br>\" }}|{{ nothing }}|{{ 3 | plus: 1 }}", json!({})).unwrap(),
            "&lt;br&gt;||4"
        );
        // already escaped text is not escaped twice
        assert_eq!(
            html("{{ event.name | escape }}", name()).unwrap(),
            NAME_ESCAPED
        );
        // {% cycle %} is an output too
        assert_eq!(
            html("{% cycle event.name, 'b' %}", name()).unwrap(),
            NAME_ESCAPED
        );
    }

    #[test]
    fn raw_filter_opts_out_of_escaping() {
        let ctx = json!({"body": "<p>Hi & bye</p>"});
        assert_eq!(
            html("{{ body | raw }}", ctx.clone()).unwrap(),
            "<p>Hi & bye</p>"
        );
        assert_eq!(
            html("{{- body | raw | upcase -}}", ctx.clone()).unwrap(),
            "<P>HI & BYE</P>"
        );
        assert_eq!(
            html("{{ body | raw | append: '<hr>' }}", ctx.clone()).unwrap(),
            "<p>Hi & bye</p><hr>"
        );
        // `raw` parses everywhere, and is the identity
        let t = Template::parse("{{ body | raw }}", "x", Some("{{ body | raw }}")).unwrap();
        let r = t.render(&ctx).unwrap();
        assert_eq!(r.subject, "<p>Hi & bye</p>");
        assert_eq!(r.text.as_deref(), Some("<p>Hi & bye</p>"));
        // {% raw %} blocks are left as they are
        assert_eq!(
            html(
                "{% raw %}{{ body }}{% endraw %}{{ body }}{%- raw -%} {{ x }} {%- endraw %}",
                ctx
            )
            .unwrap(),
            "{{ body }}&lt;p&gt;Hi &amp; bye&lt;/p&gt;{{ x }}"
        );
    }

    #[test]
    fn subject_and_text_are_not_escaped() {
        let t = Template::parse(
            "Re: {{ event.name }}",
            "{{ event.name }}",
            Some("{{ event.name }} {% cycle event.name %}"),
        )
        .unwrap();
        let r = t.render(&name()).unwrap();
        assert_eq!(r.subject, "Re: <b>\"Bo\" & 'Al'</b>");
        assert_eq!(r.html, NAME_ESCAPED);
        assert_eq!(
            r.text.as_deref(),
            Some("<b>\"Bo\" & 'Al'</b> <b>\"Bo\" & 'Al'</b>")
        );
    }

    #[test]
    fn escaping_applies_inside_blocks() {
        let source = "{% if event.name %}<h1>{{ event.name }}</h1>{% endif %}\
                      {% for i in event.items %}<li>{{ i }}{% if forloop.last %}.{% endif %}</li>{% endfor %}\
                      {% unless false %}{% case 1 %}{% when 1 %}{{ event.items[0] }}{% endcase %}{% endunless %}\
                      {% comment %} {{ don't {% endcomment %}{{ event.items[1] }}\
                      {% tablerow i in event.items %}{{ i }}{% endtablerow %}";
        assert_eq!(
            html(source, name()).unwrap(),
            format!(
                "<h1>{NAME_ESCAPED}</h1><li>&lt;i&gt;</li><li>x.</li>&lt;i&gt;x\
                 <tr class=\"row1\"><td class=\"col1\">&lt;i&gt;</td><td class=\"col2\">x</td></tr>"
            )
        );
    }

    #[test]
    fn captured_escaped_text_is_not_escaped_twice() {
        let source = "{% capture c %}<i>{{ event.name }}</i>{% endcapture %}{{ c }}|{{ c | raw }}";
        assert_eq!(
            html(source, name()).unwrap(),
            format!("&lt;i&gt;{NAME_ESCAPED}&lt;/i&gt;|<i>{NAME_ESCAPED}</i>")
        );
    }

    #[test]
    fn braces_inside_string_literals_do_not_end_an_output() {
        assert_eq!(html("{{ \"}}\" }}", json!({})).unwrap(), "}}");
        assert_eq!(
            html("{{ event.items[0] | append: \"}} <b> {{\" }}", name()).unwrap(),
            "&lt;i&gt;}} &lt;b&gt; {{"
        );
        assert_eq!(
            html("{{ '-}}' | raw }}{{ 'a|raw' | append: \"%}\" }}", json!({})).unwrap(),
            "-}}a|raw%}"
        );
        assert_eq!(
            html("{% assign x = \"{{ '<' }}\" %}{{ x }}", json!({})).unwrap(),
            "{{ &#39;&lt;&#39; }}"
        );
    }

    /// The scanner must find the outputs liquid finds: over random
    /// templates (with no `<` of their own), escaping changes nothing but
    /// the escaping of outputs, and lets no `<` of a value through.
    #[test]
    fn escaping_agrees_with_the_parser_on_random_templates() {
        const PIECES: &[&str] = &[
            "{{",
            "}}",
            "{%",
            "%}",
            "-",
            " ",
            "\n",
            "'",
            "\"",
            "x",
            "y",
            "|",
            ":",
            ",",
            ".",
            "[",
            "]",
            "(",
            "..",
            ")",
            "=",
            "1",
            "nil",
            "upcase",
            "append",
            "if",
            "endif",
            "comment",
            "endcomment",
            "endraw",
            "for",
            "in",
            "endfor",
            "capture",
            "endcapture",
            "{{ x }}",
            "{{- y -}}",
            "{{ x | append: y }}",
            "{% raw %}",
            "{%- raw -%}",
            "{% endraw %}",
            "{% comment %}",
            "{% endcomment %}",
            "{% if x %}",
            "{% endif %}",
            "{% for i in (1..2) %}",
            "{% endfor %}",
            "{% capture y %}",
            "{% endcapture %}",
            "'}}'",
            "\"{%\"",
            " {{-",
            "-%} ",
            "{{ x[",
            "{{ '",
            "x }}",
            "{{ x }}",
            "{{ y }}",
            "{{ 'a' }}",
            "{{ x | upcase }}",
            "{{ x -}}",
            " {{- y }}",
            "{{ \"}}\" }}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let render = |t: &liquid::Template, v: &str| {
            let globals = Lax::from_json(&json!({"x": v, "y": v}));
            let _budget = BudgetScope::start(Duration::from_secs(5));
            let mut out = Sink::output();
            t.render_to(&mut out, &globals)
                .map(|_| out.into_string())
                .ok()
        };
        let (mut valid, mut outputs) = (0, 0);
        for _ in 0..10_000 {
            let source: String = (0..1 + next(12))
                .map(|_| PIECES[next(PIECES.len())])
                .collect();
            let Ok(scan) = scan(&source) else { continue };
            let escaped = escape_outputs(&source, &scan.outputs);
            let parse =
                |s: &str| std::panic::catch_unwind(|| parser(true).parse(s).ok()).unwrap_or(None);
            let (Some(original), escaped_t) = (parse(&source), parse(&escaped)) else {
                continue;
            };
            let escaped_t =
                escaped_t.unwrap_or_else(|| panic!("{source:?} parses but {escaped:?} does not"));
            valid += 1;
            outputs += scan.outputs.len();
            // only escaping differs (string literals may hold quotes)
            let unescape = |s: String| {
                s.replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&quot;", "\"")
                    .replace("&#39;", "'")
                    .replace("&amp;", "&")
            };
            assert_eq!(
                render(&original, "a"),
                render(&escaped_t, "a").map(unescape),
                "{source:?} vs {escaped:?}"
            );
            if let Some(out) = render(&escaped_t, "<") {
                assert!(!out.contains('<'), "{source:?} as {escaped:?} gave {out:?}");
            }
        }
        assert!(
            valid > 1000 && outputs > 1000,
            "{valid} valid, {outputs} outputs"
        );
    }
}
