//! Tags and blocks other than loops: our `{% abort %}`, and bounded
//! replacements of the standard `assign`, `capture`, `ifchanged` and `cycle`.

use super::budget::{check_time, check_value, Sink};
use super::escape::html_escape_once;
use super::ABORT;
use liquid::model::{Value, ValueView};
use liquid_core::error::{ResultLiquidExt, ResultLiquidReplaceExt};
use liquid_core::parser::TryMatchToken;
use liquid_core::{
    BlockReflection, Expression, Language, ParseBlock, ParseTag, Renderable, Runtime, TagBlock,
    TagReflection, TagTokenIter,
};
use std::io::Write;

/// `{% abort "no stock left" %}` or `{% abort reason_variable %}`.
#[derive(Clone, Copy, Debug)]
pub(super) struct AbortTag;

impl TagReflection for AbortTag {
    fn tag(&self) -> &'static str {
        "abort"
    }
    fn description(&self) -> &'static str {
        "Stops the message from being sent, with a reason."
    }
}

impl ParseTag for AbortTag {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        _options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let reason = arguments
            .expect_next("abort needs a reason, e.g. {% abort \"out of stock\" %}")?
            .expect_value()
            .into_result()?;
        arguments.expect_nothing()?;
        Ok(Box::new(Abort(reason)))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Abort(Expression);

impl Renderable for Abort {
    fn render_to(&self, _w: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let reason = self.0.evaluate(runtime)?.to_kstr().to_string();
        Err(liquid_core::Error::with_msg(format!("{ABORT}{reason}")))
    }
}

/// The standard `{% assign name = value | filters %}`, which fails the render
/// when the value holds more than [`MAX_OUTPUT_BYTES`] (a loop doubling a
/// string would otherwise grow it exponentially without writing anything).
///
/// [`MAX_OUTPUT_BYTES`]: super::MAX_OUTPUT_BYTES
#[derive(Clone, Copy, Debug)]
pub(super) struct AssignTag;

impl TagReflection for AssignTag {
    fn tag(&self) -> &'static str {
        "assign"
    }
    fn description(&self) -> &'static str {
        "Sets a variable: {% assign name = value | filters %}."
    }
}

impl ParseTag for AssignTag {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let dst = arguments
            .expect_next("Identifier expected.")?
            .expect_identifier()
            .into_result()?
            .to_owned()
            .into();
        arguments
            .expect_next("Assignment operator \"=\" expected.")?
            .expect_str("=")
            .into_result_custom_msg("Assignment operator \"=\" expected.")?;
        let src = arguments
            .expect_next("FilterChain expected.")?
            .expect_filter_chain(options)
            .into_result()?;
        arguments.expect_nothing()?;
        Ok(Box::new(Assign { dst, src }))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Assign {
    dst: liquid::model::KString,
    src: liquid_core::parser::FilterChain,
}

impl Renderable for Assign {
    fn render_to(&self, _w: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        check_time()?;
        let trace = || format!("{{% assign {} = {}%}}", self.dst, self.src);
        let value = self
            .src
            .evaluate(runtime)
            .trace_with(|| trace().into())?
            .into_owned();
        check_value(&value, || format!("`{{% assign {} %}}`", self.dst))?;
        runtime.set_global(self.dst.clone(), value);
        Ok(())
    }
}

/// The standard `{% capture name %}...{% endcapture %}`, capturing at most
/// [`MAX_OUTPUT_BYTES`].
///
/// [`MAX_OUTPUT_BYTES`]: super::MAX_OUTPUT_BYTES
#[derive(Clone, Copy, Debug)]
pub(super) struct CaptureBlock;

impl BlockReflection for CaptureBlock {
    fn start_tag(&self) -> &str {
        "capture"
    }
    fn end_tag(&self) -> &str {
        "endcapture"
    }
    fn description(&self) -> &str {
        "Renders its body into a variable."
    }
}

impl ParseBlock for CaptureBlock {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut tokens: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let id: liquid::model::KString = arguments
            .expect_next("Identifier expected")?
            .expect_identifier()
            .into_result()?
            .to_owned()
            .into();
        arguments.expect_nothing()?;
        let template = liquid_core::Template::new(
            tokens
                .parse_all(options)
                .trace_with(|| format!("{{% capture {} %}}", &id).into())?,
        );
        tokens.assert_empty();
        Ok(Box::new(Capture { id, template }))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct Capture {
    id: liquid::model::KString,
    template: liquid_core::Template,
}

impl Renderable for Capture {
    fn render_to(&self, _w: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let mut captured = Sink::value(format!("`{{% capture {} %}}`", self.id));
        self.template
            .render_to(&mut captured, runtime)
            .trace_with(|| format!("{{% capture {} %}}", self.id).into())?;
        runtime.set_global(self.id.clone(), Value::scalar(captured.into_string()));
        Ok(())
    }
}

/// The standard `{% ifchanged %}...{% endifchanged %}`, rendering its body
/// into a bounded buffer.
#[derive(Clone, Copy, Debug)]
pub(super) struct IfChangedBlock;

impl BlockReflection for IfChangedBlock {
    fn start_tag(&self) -> &str {
        "ifchanged"
    }
    fn end_tag(&self) -> &str {
        "endifchanged"
    }
    fn description(&self) -> &str {
        "Renders its body only when it differs from the last time."
    }
}

impl ParseBlock for IfChangedBlock {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut tokens: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        arguments.expect_nothing()?;
        let body = liquid_core::Template::new(tokens.parse_all(options)?);
        tokens.assert_empty();
        Ok(Box::new(IfChanged(body)))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct IfChanged(liquid_core::Template);

/// The last body an `{% ifchanged %}` rendered.
#[derive(Debug, Default)]
struct ChangedRegister(Option<String>);

impl Renderable for IfChanged {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let mut rendered = Sink::value("`{% ifchanged %}`".to_owned());
        self.0
            .render_to(&mut rendered, runtime)
            .trace("{% ifchanged %}")?;
        let rendered = rendered.into_string();
        let changed = {
            let mut last = runtime.registers().get_mut::<ChangedRegister>();
            if last.0.as_deref() == Some(rendered.as_str()) {
                false
            } else {
                last.0 = Some(rendered.clone());
                true
            }
        };
        if changed {
            writer
                .write_all(rendered.as_bytes())
                .replace("Failed to render")?;
        }
        Ok(())
    }
}

/// The standard `{% cycle "a", "b" %}` / `{% cycle group: "a", "b" %}`; in
/// the html part its output is HTML-escaped like `{{ }}`'s.
#[derive(Clone, Copy, Debug)]
pub(super) struct CycleTag {
    pub(super) escape: bool,
}

impl TagReflection for CycleTag {
    fn tag(&self) -> &'static str {
        "cycle"
    }
    fn description(&self) -> &'static str {
        "Outputs its values in turn, one per call."
    }
}

impl ParseTag for CycleTag {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        _options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let mut name = String::new();
        let mut values = Vec::new();
        let first = arguments.expect_next("Identifier or value expected")?;
        let second = arguments.next();
        match second.as_ref().map(|t| t.as_str()) {
            Some(":") => {
                name = match first.expect_identifier() {
                    TryMatchToken::Matches(name) => name.to_owned(),
                    TryMatchToken::Fails(name) => match name.expect_literal() {
                        TryMatchToken::Matches(name) => name.to_kstr().into_string(),
                        TryMatchToken::Fails(name) => return name.raise_error().into_err(),
                    },
                };
            }
            Some(",") | None => values.push(first.expect_value().into_result()?),
            Some(_) => {
                return second
                    .expect("is some")
                    .raise_custom_error("\":\" or \",\" expected.")
                    .into_err();
            }
        }
        while let Some(a) = arguments.next() {
            values.push(a.expect_value().into_result()?);
            let next = arguments.next();
            match next.as_ref().map(|t| t.as_str()) {
                Some(",") => {}
                None => break,
                Some(_) => {
                    return next
                        .expect("is some")
                        .raise_custom_error("\",\" expected.")
                        .into_err();
                }
            }
        }
        if values.is_empty() {
            return Err(arguments.raise_error("Value expected."));
        }
        if name.is_empty() {
            name = values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("-");
        }
        arguments.expect_nothing()?;
        Ok(Box::new(Cycle {
            name,
            values,
            escape: self.escape,
        }))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Cycle {
    name: String,
    values: Vec<Expression>,
    escape: bool,
}

/// How far each `{% cycle %}` group has gone.
#[derive(Debug, Default)]
struct CycleRegister(std::collections::HashMap<String, usize>);

impl Renderable for Cycle {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let index = {
            let mut register = runtime.registers().get_mut::<CycleRegister>();
            let i = register.0.entry(self.name.clone()).or_insert(0);
            let current = *i % self.values.len();
            *i = (current + 1) % self.values.len();
            current
        };
        let value = self.values[index]
            .evaluate(runtime)
            .trace_with(|| format!("{{% cycle {} %}}", self.name).into())?;
        let text = value.to_kstr();
        let text = if self.escape {
            html_escape_once(text.as_str())
        } else {
            text.as_str().to_owned()
        };
        writer
            .write_all(text.as_bytes())
            .replace("Failed to render")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::render::{RenderError, Template};
    use serde_json::json;

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
}
