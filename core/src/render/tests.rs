//! Tests of whole templates that exercise several parts of the renderer at
//! once, and the helpers the other files' tests share.

use super::*;
use serde_json::json;

#[test]
fn renders_with_fallbacks_for_missing_fields() {
    let t = Template::parse(
        "Still thinking about {{ event.product }}, {{ profile.first_name | default: \"there\" }}?",
        "<p>{% if profile.vip %}VIP {% endif %}{{ event.cart.total | default: 0 }} {{ nothing }}</p>",
        Some("{% for i in event.items %}{{ i.sku }};{% endfor %}"),
    )
    .unwrap();
    let r = t
        .render(&json!({"event": {"product": "Boots", "items": [{"sku": "a"}, {"sku": "b"}]}, "profile": {}}))
        .unwrap();
    assert_eq!(r.subject, "Still thinking about Boots, there?");
    assert_eq!(r.html, "<p>0 </p>");
    assert_eq!(r.text.as_deref(), Some("a;b;"));
    let r = t
        .render(&json!({"event": {}, "profile": {"first_name": "Ada", "vip": true}}))
        .unwrap();
    assert_eq!(r.subject, "Still thinking about , Ada?");
    assert!(r.html.starts_with("<p>VIP "));
}

#[test]
fn syntax_errors_name_the_part_and_line() {
    let e = Template::parse("ok", "line one\n{% if x %}\nunclosed", None)
        .err()
        .unwrap();
    assert!(e.starts_with("html: "), "{e}");
    let e = Template::parse("Hi {{ name", "x", None).err().unwrap();
    assert!(e.starts_with("subject: line 1: "), "{e}");
    let e = Template::parse("s", "a\nb\n{{ x | }}", None).err().unwrap();
    assert!(
        e.starts_with("html: line 3: syntax error near `{{ x | }}`"),
        "{e}"
    );
}

pub(super) fn html(source: &str, context: Json) -> Result<String, RenderError> {
    Template::parse("s", source, None)
        .unwrap_or_else(|e| panic!("{source:?} does not parse: {e}"))
        .render(&context)
        .map(|r| r.html)
}

pub(super) fn failure(source: &str, context: Json) -> String {
    match html(source, context) {
        Err(RenderError::Failed(m)) => m,
        other => panic!("{source:?} should fail, got {other:?}"),
    }
}

#[test]
fn html_parse_errors_name_the_original_line() {
    let e = Template::parse(
        "s",
        "{{ a }}\n<p>{{ b | upcase }}</p>\n{{ c }}\n{% if %}",
        None,
    )
    .err()
    .unwrap();
    assert!(e.starts_with("html: line 4: "), "{e}");
    assert!(!e.contains("escape_once"), "{e}");
    let e = Template::parse("s", "{{ a }}\n{{ b | upcase: }}", None)
        .err()
        .unwrap();
    assert!(
        e.starts_with("html: line 2: syntax error near `{{ b | upcase: }}`"),
        "{e}"
    );
    assert!(!e.contains("escape_once"), "{e}");
    let e = Template::parse("s", "{{ a }}\n{{ nilly }}", None)
        .err()
        .unwrap();
    assert!(e.starts_with("html: line 2: "), "{e}");
}

#[test]
fn parser_panics_become_errors() {
    let e = Template::parse("s", "x\n{% comment %}{% raw %}", None)
        .err()
        .unwrap();
    assert!(e.starts_with("html: "), "{e}");
    let e = Template::parse("s", "{% cycle 'g': %}", None)
        .err()
        .unwrap();
    assert!(e.starts_with("html: line 1: "), "{e}");
    let t = Template::parse(
        "s",
        "{% tablerow x in (1..3) cols: 0 %}{{ x }}{% endtablerow %}",
        None,
    );
    assert!(t.unwrap().render(&json!({})).unwrap().html.contains("col3"));
}

#[test]
fn standard_tags_behave_as_before() {
    let ctx = json!({"xs": [1, 2, 3, 4, 5], "o": {"k": "v"}});
    let out = html(
        "{% for x in xs limit: 2 offset: 1 %}{{ x }}{% endfor %};\
         {% for x in xs reversed %}{{ x }}{% if x == 3 %}{% break %}{% endif %}{% endfor %};\
         {% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{{ forloop.index }}{% endfor %};\
         {% for x in xs limit: 1 %}{% for y in xs limit: 1 %}{{ forloop.parentloop.length }}{% endfor %}{% endfor %};\
         {% for p in o %}{{ p[0] }}={{ p[1] }}{% endfor %};\
         {% for x in nothing %}y{% else %}empty{% endfor %};\
         {% for x in xs %}{% cycle 'a', 'b' %}{% endfor %};\
         {% for x in xs %}{% ifchanged %}{{ x | divided_by: 2 }}{% endifchanged %}{% endfor %};\
         {% tablerow x in xs cols: 2 limit: 3 %}{{ x }}{% endtablerow %};\
         {% assign n = xs | size %}{{ n }}{% capture c %}[{{ n }}]{% endcapture %}{{ c }}",
        ctx,
    )
    .unwrap();
    assert_eq!(
        out,
        "23;543;1345;1;k=v;empty;ababa;012;\
         <tr class=\"row1\"><td class=\"col1\">1</td><td class=\"col2\">2</td></tr>\
         <tr class=\"row2\"><td class=\"col1\">3</td></tr>;5[5]"
    );
}

#[test]
fn a_subject_stays_one_header_line() {
    let t = Template::parse("Hi {{ event.name }}", "<p>x</p>", None).unwrap();
    let r = t
        .render(&json!({"event": {"name": "Ann\r\nBcc: all@example.com"}}))
        .unwrap();
    assert_eq!(r.subject, "Hi Ann Bcc: all@example.com");
}

#[test]
fn numbers_beyond_a_double_render_as_written() {
    let ctx: Json = serde_json::from_str(
        r#"{"big": 1e400, "wide": 12345678901234567890123, "n": 7, "x": 2.5}"#,
    )
    .unwrap();
    assert_eq!(
        html(
            "{{ big }}|{{ wide }}|{{ n | plus: 1 }}|{{ x | times: 2 }}",
            ctx
        )
        .unwrap(),
        "1e+400|12345678901234567890123|8|5"
    );
}
