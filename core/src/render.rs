//! Liquid templates: parsed when defined, rendered with a context in which a
//! missing variable is nil (renders empty, so `| default:` works) instead of
//! an error, the way Shopify's Liquid, Customer.io and Braze behave.

use liquid::model::{
    ArrayView, DisplayCow, KStringCow, ObjectView, ScalarCow, State, Value, ValueView,
};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;

/// A template's three parts, parsed.
pub struct Template {
    subject: liquid::Template,
    html: liquid::Template,
    text: Option<liquid::Template>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub subject: String,
    pub html: String,
    pub text: Option<String>,
}

fn parser() -> &'static liquid::Parser {
    static P: std::sync::OnceLock<liquid::Parser> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        liquid::ParserBuilder::with_stdlib()
            .tag(AbortTag)
            .build()
            .expect("the standard Liquid library builds")
    })
}

/// Marks an error raised by `{% abort %}` (Braze's abort_message): the
/// template decided that this message must not go out.
const ABORT: &str = "nudge-abort: ";

/// Why a render did not produce a message.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderError {
    /// `{% abort "reason" %}` ran.
    Aborted(String),
    Failed(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Aborted(r) => write!(f, "aborted by the template: {r}"),
            RenderError::Failed(e) => write!(f, "render failed: {e}"),
        }
    }
}

/// `{% abort "no stock left" %}` or `{% abort reason_variable %}`.
#[derive(Clone, Copy, Debug)]
struct AbortTag;

impl liquid_core::TagReflection for AbortTag {
    fn tag(&self) -> &'static str {
        "abort"
    }
    fn description(&self) -> &'static str {
        "Stops the message from being sent, with a reason."
    }
}

impl liquid_core::ParseTag for AbortTag {
    fn parse(
        &self,
        mut arguments: liquid_core::TagTokenIter<'_>,
        _options: &liquid_core::Language,
    ) -> liquid_core::Result<Box<dyn liquid_core::Renderable>> {
        let reason = arguments
            .expect_next("abort needs a reason, e.g. {% abort \"out of stock\" %}")?
            .expect_value()
            .into_result()?;
        arguments.expect_nothing()?;
        Ok(Box::new(Abort(reason)))
    }
    fn reflection(&self) -> &dyn liquid_core::TagReflection {
        self
    }
}

#[derive(Debug)]
struct Abort(liquid_core::Expression);

impl liquid_core::Renderable for Abort {
    fn render_to(
        &self,
        _w: &mut dyn std::io::Write,
        runtime: &dyn liquid_core::Runtime,
    ) -> liquid_core::Result<()> {
        let reason = self.0.evaluate(runtime)?.to_kstr().to_string();
        Err(liquid_core::Error::with_msg(format!("{ABORT}{reason}")))
    }
}
/// Parses one part; the error names the part and the line.
fn parse_part(part: &str, source: &str) -> Result<liquid::Template, String> {
    parser()
        .parse(source)
        .map_err(|e| format!("{part}: {}", describe(&e.to_string(), source)))
}

/// liquid's parse errors point at `line:column` (` --> 2:5`); repeat the line
/// in words so that the message reads well inside a Postgres ERROR.
fn describe(err: &str, source: &str) -> String {
    let flat = one_line(err);
    let line = err
        .split("-->")
        .nth(1)
        .and_then(|rest| rest.trim().split(':').next())
        .and_then(|n| n.trim().parse::<usize>().ok());
    match line {
        Some(n) => {
            let text = source.lines().nth(n.saturating_sub(1)).unwrap_or("").trim();
            format!("line {n}: syntax error near `{text}` ({flat})")
        }
        None => flat,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Template {
    pub fn parse(subject: &str, html: &str, text: Option<&str>) -> Result<Template, String> {
        Ok(Template {
            subject: parse_part("subject", subject)?,
            html: parse_part("html", html)?,
            text: text.map(|t| parse_part("text_body", t)).transpose()?,
        })
    }

    /// Renders with `context` (a JSON object whose keys are the template's globals).
    pub fn render(&self, context: &Json) -> Result<Rendered, RenderError> {
        let globals = Lax::from_json(context);
        let run = |part: &str, t: &liquid::Template| {
            t.render(&globals).map_err(|e| {
                let text = one_line(&e.to_string());
                match text.find(ABORT) {
                    Some(i) => {
                        let reason = &text[i + ABORT.len()..];
                        // liquid appends its trace after the message
                        let reason = reason.split(" from: ").next().unwrap_or(reason);
                        RenderError::Aborted(reason.trim().to_string())
                    }
                    None => RenderError::Failed(format!("{part}: {text}")),
                }
            })
        };
        Ok(Rendered {
            subject: run("subject", &self.subject)?.trim().to_owned(),
            html: run("html", &self.html)?,
            text: self
                .text
                .as_ref()
                .map(|t| run("text_body", t))
                .transpose()?,
        })
    }
}

/// A JSON tree seen by Liquid, in which every missing key is nil.
#[derive(Debug)]
enum Lax {
    Nil,
    Scalar(Value),
    Array(Vec<Lax>),
    Object(BTreeMap<String, Lax>),
}

static NIL: Lax = Lax::Nil;

impl Lax {
    fn from_json(v: &Json) -> Lax {
        match v {
            Json::Null => Lax::Nil,
            Json::Array(a) => Lax::Array(a.iter().map(Lax::from_json).collect()),
            Json::Object(m) => Lax::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Lax::from_json(v)))
                    .collect(),
            ),
            scalar => Lax::Scalar(liquid::model::to_value(scalar).unwrap_or(Value::Nil)),
        }
    }
}

impl ValueView for Lax {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        match self {
            Lax::Nil => DisplayCow::Borrowed(&""),
            Lax::Scalar(v) => v.render(),
            _ => DisplayCow::Owned(Box::new(self.to_value().render().to_string())),
        }
    }
    fn source(&self) -> DisplayCow<'_> {
        match self {
            Lax::Scalar(v) => v.source(),
            _ => DisplayCow::Owned(Box::new(self.to_value().source().to_string())),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Lax::Nil => "nil",
            Lax::Scalar(v) => v.type_name(),
            Lax::Array(_) => "array",
            Lax::Object(_) => "object",
        }
    }
    fn query_state(&self, state: State) -> bool {
        match self {
            Lax::Nil => Value::Nil.query_state(state),
            Lax::Scalar(v) => v.query_state(state),
            Lax::Array(a) => match state {
                State::Truthy => true,
                _ => a.is_empty(),
            },
            Lax::Object(m) => match state {
                State::Truthy => true,
                _ => m.is_empty(),
            },
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        match self {
            Lax::Nil => KStringCow::from_static(""),
            Lax::Scalar(v) => v.to_kstr(),
            _ => KStringCow::from_string(self.render().to_string()),
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Lax::Nil => Value::Nil,
            Lax::Scalar(v) => v.clone(),
            Lax::Array(a) => Value::Array(a.iter().map(ValueView::to_value).collect()),
            Lax::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone().into(), v.to_value()))
                    .collect(),
            ),
        }
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        match self {
            Lax::Scalar(v) => v.as_scalar(),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        matches!(self, Lax::Array(_)).then_some(self as &dyn ArrayView)
    }
    // Nil answers as an empty object too, so that `a.b.c` is nil when `a` is missing.
    fn as_object(&self) -> Option<&dyn ObjectView> {
        matches!(self, Lax::Object(_) | Lax::Nil).then_some(self as &dyn ObjectView)
    }
    fn is_nil(&self) -> bool {
        matches!(self, Lax::Nil)
    }
}

impl ArrayView for Lax {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        match self {
            Lax::Array(a) => a.len() as i64,
            _ => 0,
        }
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        match self {
            Lax::Array(a) => Box::new(a.iter().map(|v| v as &dyn ValueView)),
            _ => Box::new(std::iter::empty()),
        }
    }
    fn contains_key(&self, index: i64) -> bool {
        ArrayView::get(self, index).is_some()
    }
    fn get(&self, index: i64) -> Option<&dyn ValueView> {
        let Lax::Array(a) = self else { return None };
        let i = if index < 0 {
            a.len() as i64 + index
        } else {
            index
        };
        usize::try_from(i)
            .ok()
            .and_then(|i| <[Lax]>::get(a, i))
            .map(|v| v as &dyn ValueView)
    }
}

impl ObjectView for Lax {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        match self {
            Lax::Object(m) => m.len() as i64,
            _ => 0,
        }
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        match self {
            Lax::Object(m) => Box::new(m.keys().map(|k| KStringCow::from_ref(k.as_str()))),
            _ => Box::new(std::iter::empty()),
        }
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        match self {
            Lax::Object(m) => Box::new(m.values().map(|v| v as &dyn ValueView)),
            _ => Box::new(std::iter::empty()),
        }
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        match self {
            Lax::Object(m) => Box::new(
                m.iter()
                    .map(|(k, v)| (KStringCow::from_ref(k.as_str()), v as &dyn ValueView)),
            ),
            _ => Box::new(std::iter::empty()),
        }
    }
    fn contains_key(&self, _index: &str) -> bool {
        true
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        let found = match self {
            Lax::Object(m) => m.get(index),
            _ => None,
        };
        Some(found.unwrap_or(&NIL) as &dyn ValueView)
    }
}

#[cfg(test)]
mod tests {
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
    fn abort_stops_the_message_with_its_reason() {
        let t = Template::parse(
            "Hi",
            "{% if context.cart == nil %}{% abort \"the cart is empty\" %}{% endif %}{{ context.cart.total }}",
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&json!({"context": {}})).unwrap_err(),
            RenderError::Aborted("the cart is empty".into())
        );
        assert_eq!(
            t.render(&json!({"context": {"cart": {"total": 12}}}))
                .unwrap()
                .html,
            "12"
        );
        assert!(
            Template::parse("s", "{% abort %}", None).is_err(),
            "a reason is required"
        );
        let e = Template::parse("s", "{{ 1 | divided_by: 0 }}", None)
            .unwrap()
            .render(&json!({}))
            .unwrap_err();
        assert!(
            matches!(e, RenderError::Failed(m) if m.starts_with("subject: ") || m.starts_with("html: "))
        );
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
}
