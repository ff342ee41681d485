//! The `for` and `tablerow` loops, which spend the render's iteration budget
//! and take only short literal ranges.

use super::budget::{check_time, spend_iterations};
use super::{LIMIT, MAX_RANGE_SPAN};
use liquid::model::{ObjectView, Value, ValueCow, ValueView};
use liquid_core::error::{ResultLiquidExt, ResultLiquidReplaceExt};
use liquid_core::parser::{BlockElement, TryMatchToken};
use liquid_core::runtime::{Interrupt, InterruptRegister, StackFrame};
use liquid_core::{
    BlockReflection, Expression, Language, ParseBlock, Renderable, Runtime, TagBlock, TagTokenIter,
};
use std::fmt;
use std::io::Write;

/// What a `for`/`tablerow` loop iterates.
#[derive(Debug)]
enum LoopSource {
    /// An array (or object, or nil) from the context or a variable.
    Value(Expression),
    /// `(a..b)`, inclusive, with literal bounds at most [`MAX_RANGE_SPAN`]
    /// apart (checked when parsing).
    Range(i64, i64),
}

impl fmt::Display for LoopSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoopSource::Value(e) => write!(f, "{e}"),
            LoopSource::Range(a, b) => write!(f, "({a}..{b})"),
        }
    }
}

/// Parses `in`'s operand: a value, or a range whose bounds must be integer
/// literals at most [`MAX_RANGE_SPAN`] apart, as liquid materialises ranges.
fn parse_loop_source(
    tag: &str,
    arguments: &mut TagTokenIter<'_>,
) -> liquid_core::Result<LoopSource> {
    let token = arguments.expect_next("Array or range expected.")?;
    let token = match token.expect_value() {
        TryMatchToken::Matches(value) => return Ok(LoopSource::Value(value)),
        TryMatchToken::Fails(token) => token,
    };
    let (start, stop) = match token.expect_range() {
        TryMatchToken::Matches(range) => range,
        TryMatchToken::Fails(token) => return token.raise_error().into_err(),
    };
    let literal = |e: &Expression| match e {
        Expression::Literal(v) => v.as_scalar().and_then(|s| s.to_integer()),
        Expression::Variable(_) => None,
    };
    match (literal(&start), literal(&stop)) {
        (Some(a), Some(b)) if b.saturating_sub(a) <= MAX_RANGE_SPAN => Ok(LoopSource::Range(a, b)),
        _ => Err(arguments.raise_error(&format!(
            "{LIMIT}a range in a {tag} loop needs literal integer bounds at most \
             {MAX_RANGE_SPAN} apart, e.g. (1..10); loop over an array for more"
        ))),
    }
}

/// An optional `limit:`/`offset:`/`cols:` value, as liquid reads it.
fn parse_attr(arguments: &mut TagTokenIter<'_>) -> liquid_core::Result<Expression> {
    arguments
        .expect_next("\":\" expected.")?
        .expect_str(":")
        .into_result_custom_msg("\":\" expected.")?;
    arguments
        .expect_next("Value expected.")?
        .expect_value()
        .into_result()
}

fn evaluate_attr(
    attr: &Option<Expression>,
    runtime: &dyn Runtime,
) -> liquid_core::Result<Option<usize>> {
    let Some(attr) = attr else { return Ok(None) };
    let value = attr.evaluate(runtime)?;
    let n = value
        .as_scalar()
        .and_then(|s| s.to_integer())
        .ok_or_else(|| {
            liquid_core::Error::with_msg(format!(
                "Expected whole number, found `{}`",
                value.type_name()
            ))
        })?;
    // liquid reads a negative number as a huge one
    Ok(Some(n as usize))
}

/// The items a loop visits, after `offset` and `limit`; each spends one of
/// the render's iterations, so that no loop materialises more than
/// [`MAX_ITERATIONS`] items.
fn loop_items<'v>(
    source: &LoopSource,
    value: Option<&'v dyn ValueView>,
    limit: Option<usize>,
    offset: usize,
) -> liquid_core::Result<Vec<ValueCow<'v>>> {
    let window = |len: usize| {
        let start = offset.min(len);
        let end = limit.map_or(len, |l| start.saturating_add(l).min(len));
        start..end
    };
    let mut items = Vec::new();
    match (source, value) {
        (LoopSource::Range(a, b), _) => {
            let len = if b >= a { (b - a) as usize + 1 } else { 0 };
            for i in window(len) {
                spend_iterations(1)?;
                items.push(ValueCow::Owned(Value::scalar(a + i as i64)));
            }
        }
        (LoopSource::Value(_), Some(value)) => {
            if let Some(array) = value.as_array() {
                for i in window(array.size().max(0) as usize) {
                    spend_iterations(1)?;
                    items.push(match array.get(i as i64) {
                        Some(v) => ValueCow::Borrowed(v),
                        None => ValueCow::Owned(Value::Nil),
                    });
                }
            } else if let Some(object) = value.as_object() {
                let range = window(object.size().max(0) as usize);
                for (k, v) in object.iter().skip(range.start).take(range.len()) {
                    spend_iterations(1)?;
                    items.push(ValueCow::Owned(Value::Array(vec![
                        Value::scalar(k.into_owned()),
                        v.to_value(),
                    ])));
                }
            } else if !(value.is_state() || value.is_nil()) {
                return Err(liquid_core::Error::with_msg(format!(
                    "Expected array, found `{}`",
                    value.type_name()
                )));
            }
        }
        (LoopSource::Value(_), None) => {}
    }
    Ok(items)
}

/// `x in xs` (or `x in (1..3)`), the head `for` and `tablerow` share.
fn parse_loop_head<'a>(
    tag: &str,
    arguments: &mut TagTokenIter<'a>,
) -> liquid_core::Result<(&'a str, LoopSource)> {
    let var_name = arguments
        .expect_next("Identifier expected.")?
        .expect_identifier()
        .into_result()?;
    arguments
        .expect_next("\"in\" expected.")?
        .expect_str("in")
        .into_result_custom_msg("\"in\" expected.")?;
    Ok((var_name, parse_loop_source(tag, arguments)?))
}

/// The standard `{% for x in xs limit: n offset: n reversed %}...{% else %}
/// ...{% endfor %}`, spending the render's iteration budget per item and
/// checking the deadline at every iteration.
#[derive(Clone, Copy, Debug)]
pub(super) struct ForBlock;

impl BlockReflection for ForBlock {
    fn start_tag(&self) -> &str {
        "for"
    }
    fn end_tag(&self) -> &str {
        "endfor"
    }
    fn description(&self) -> &str {
        "Renders its body once per item."
    }
}

impl ParseBlock for ForBlock {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut tokens: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let (var_name, source) = parse_loop_head("for", &mut arguments)?;

        let mut limit = None;
        let mut offset = None;
        let mut reversed = false;
        while let Some(token) = arguments.next() {
            match token.as_str() {
                "limit" => limit = Some(parse_attr(&mut arguments)?),
                "offset" => offset = Some(parse_attr(&mut arguments)?),
                "reversed" => reversed = true,
                _ => {
                    return token
                        .raise_custom_error("\"limit\", \"offset\" or \"reversed\" expected.")
                        .into_err();
                }
            }
        }
        arguments.expect_nothing()?;

        let mut body = Vec::new();
        let mut otherwise = None;
        while let Some(element) = tokens.next()? {
            match element {
                BlockElement::Tag(mut tag) => match tag.name() {
                    "else" => {
                        tag.tokens().expect_nothing()?;
                        otherwise = Some(tokens.parse_all(options)?);
                        break;
                    }
                    _ => body.push(tag.parse(&mut tokens, options)?),
                },
                element => body.push(element.parse(&mut tokens, options)?),
            }
        }
        tokens.assert_empty();
        Ok(Box::new(For {
            var_name: var_name.to_owned().into(),
            source,
            body: liquid_core::Template::new(body),
            otherwise: otherwise.map(liquid_core::Template::new),
            limit,
            offset,
            reversed,
        }))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct For {
    var_name: liquid::model::KString,
    source: LoopSource,
    body: liquid_core::Template,
    otherwise: Option<liquid_core::Template>,
    limit: Option<Expression>,
    offset: Option<Expression>,
    reversed: bool,
}

impl For {
    fn trace(&self) -> String {
        format!("{{% for {} in {} %}}", self.var_name, self.source)
    }
}

#[derive(Debug, Clone, liquid::ValueView, liquid::ObjectView)]
struct ForloopObject<'p> {
    length: i64,
    parentloop: Option<&'p dyn ValueView>,
    index0: i64,
    index: i64,
    rindex0: i64,
    rindex: i64,
    first: bool,
    last: bool,
}

impl Renderable for For {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let value = match &self.source {
            LoopSource::Value(e) => Some(e.evaluate(runtime).trace_with(|| self.trace().into())?),
            LoopSource::Range(..) => None,
        };
        let limit = evaluate_attr(&self.limit, runtime)?;
        let offset = evaluate_attr(&self.offset, runtime)?.unwrap_or(0);
        let mut items = loop_items(
            &self.source,
            value.as_ref().map(|v| v.as_view()),
            limit,
            offset,
        )
        .trace_with(|| self.trace().into())?;
        if self.reversed {
            items.reverse();
        }

        if items.is_empty() {
            if let Some(otherwise) = &self.otherwise {
                otherwise
                    .render_to(writer, runtime)
                    .trace("{% else %}")
                    .trace_with(|| self.trace().into())?;
            }
            return Ok(());
        }

        let parentloop = runtime.try_get(&[liquid::model::Scalar::new("forloop")]);
        let parentloop = parentloop.as_ref().map(|v| v.as_view());
        let len = items.len() as i64;
        for (i, item) in items.iter().enumerate() {
            check_time()?;
            let i = i as i64;
            let forloop = ForloopObject {
                length: len,
                parentloop,
                index0: i,
                index: i + 1,
                rindex0: len - i - 1,
                rindex: len - i,
                first: i == 0,
                last: i == len - 1,
            };
            let mut root =
                std::collections::HashMap::<liquid::model::KStringRef<'_>, &dyn ValueView>::new();
            root.insert("forloop".into(), &forloop);
            root.insert(self.var_name.as_ref(), item.as_view());
            let scope = StackFrame::new(runtime, &root);
            self.body
                .render_to(writer, &scope)
                .trace_with(|| self.trace().into())
                .context_key("index")
                .value_with(|| format!("{}", i + 1).into())?;
            // `continue` just ends this iteration; `break` ends the loop
            let interrupt = scope.registers().get_mut::<InterruptRegister>().reset();
            if let Some(Interrupt::Break) = interrupt {
                break;
            }
        }
        Ok(())
    }
}

/// The standard `{% tablerow x in xs cols: n limit: n offset: n %}`, with the
/// same budget as `for`.
#[derive(Clone, Copy, Debug)]
pub(super) struct TableRowBlock;

impl BlockReflection for TableRowBlock {
    fn start_tag(&self) -> &str {
        "tablerow"
    }
    fn end_tag(&self) -> &str {
        "endtablerow"
    }
    fn description(&self) -> &str {
        "Renders its body once per item, as the cells of HTML table rows."
    }
}

impl ParseBlock for TableRowBlock {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut tokens: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let (var_name, source) = parse_loop_head("tablerow", &mut arguments)?;

        let mut cols = None;
        let mut limit = None;
        let mut offset = None;
        while let Some(token) = arguments.next() {
            match token.as_str() {
                "cols" => cols = Some(parse_attr(&mut arguments)?),
                "limit" => limit = Some(parse_attr(&mut arguments)?),
                "offset" => offset = Some(parse_attr(&mut arguments)?),
                _ => {
                    return token
                        .raise_custom_error("\"cols\", \"limit\" or \"offset\" expected.")
                        .into_err();
                }
            }
        }
        arguments.expect_nothing()?;

        let body = liquid_core::Template::new(tokens.parse_all(options)?);
        tokens.assert_empty();
        Ok(Box::new(TableRow {
            var_name: var_name.to_owned().into(),
            source,
            body,
            cols,
            limit,
            offset,
        }))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct TableRow {
    var_name: liquid::model::KString,
    source: LoopSource,
    body: liquid_core::Template,
    cols: Option<Expression>,
    limit: Option<Expression>,
    offset: Option<Expression>,
}

impl TableRow {
    fn trace(&self) -> String {
        format!("{{% tablerow {} in {} %}}", self.var_name, self.source)
    }
}

#[derive(Debug, Clone, liquid::ValueView, liquid::ObjectView)]
struct TableRowObject {
    length: i64,
    index0: i64,
    index: i64,
    rindex0: i64,
    rindex: i64,
    first: bool,
    last: bool,
    col0: i64,
    col: i64,
    col_first: bool,
    col_last: bool,
}

impl Renderable for TableRow {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let value = match &self.source {
            LoopSource::Value(e) => Some(e.evaluate(runtime).trace_with(|| self.trace().into())?),
            LoopSource::Range(..) => None,
        };
        let cols = evaluate_attr(&self.cols, runtime)?;
        let limit = evaluate_attr(&self.limit, runtime)?;
        let offset = evaluate_attr(&self.offset, runtime)?.unwrap_or(0);
        let items = loop_items(
            &self.source,
            value.as_ref().map(|v| v.as_view()),
            limit,
            offset,
        )
        .trace_with(|| self.trace().into())?;

        let len = items.len();
        // `cols: 0` would divide by zero: one row then, as without `cols`
        let cols = cols.filter(|&c| c > 0).unwrap_or(len).max(1);
        for (i, item) in items.iter().enumerate() {
            check_time()?;
            let (col, row) = (i % cols, i / cols);
            let (i, n, c, cs) = (i as i64, len as i64, col as i64, cols as i64);
            let tablerow = TableRowObject {
                length: n,
                index0: i,
                index: i + 1,
                rindex0: n - i - 1,
                rindex: n - i,
                first: i == 0,
                last: i == n - 1,
                col0: c,
                col: c + 1,
                col_first: c == 0,
                col_last: c == cs - 1 || i == n - 1,
            };
            let mut root =
                std::collections::HashMap::<liquid::model::KStringRef<'_>, &dyn ValueView>::new();
            root.insert("tablerow".into(), &tablerow);
            root.insert(self.var_name.as_ref(), item.as_view());
            if tablerow.col_first {
                write!(writer, "<tr class=\"row{}\">", row + 1).replace("Failed to render")?;
            }
            write!(writer, "<td class=\"col{}\">", col + 1).replace("Failed to render")?;
            let scope = StackFrame::new(runtime, &root);
            self.body
                .render_to(writer, &scope)
                .trace_with(|| self.trace().into())
                .context_key("index")
                .value_with(|| format!("{}", i + 1).into())?;
            write!(writer, "</td>").replace("Failed to render")?;
            if tablerow.col_last {
                write!(writer, "</tr>").replace("Failed to render")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::render::tests::{failure, html};
    use crate::render::Template;
    use serde_json::json;
    use std::time::{Duration, Instant};

    #[test]
    fn loops_stop_after_the_iteration_budget() {
        let ctx = json!({"event": {"items": (0..1000).collect::<Vec<_>>()}});
        let start = Instant::now();
        let e = failure(
            "{% for a in event.items %}{% for b in event.items %}{% endfor %}{% endfor %}",
            ctx.clone(),
        );
        assert_eq!(e, "html: template exceeded 100000 loop iterations");
        let e = failure(
            "{% for a in (1..10000) %}{% for b in (1..10000) %}{% for c in (1..10000) %}\
             {% endfor %}{% endfor %}{% endfor %}",
            ctx,
        );
        assert_eq!(e, "html: template exceeded 100000 loop iterations");
        let big = json!({"big": vec![1; 150_000]});
        let e = failure("{% for x in big %}{% endfor %}", big.clone());
        assert_eq!(e, "html: template exceeded 100000 loop iterations");
        let e = failure(
            "{% tablerow x in big limit: 200000 %}{% endtablerow %}",
            big,
        );
        assert_eq!(e, "html: template exceeded 100000 loop iterations");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn ranges_must_be_literal_and_short() {
        let e = Template::parse(
            "s",
            "a\nb\n{% for i in (1..1000000000000) %}{{ i }}{% endfor %}",
            None,
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with(
                "html: line 3: a range in a for loop needs literal integer bounds at most 10000 apart"
            ),
            "{e}"
        );
        let e = Template::parse(
            "{% tablerow i in (-5..event.n) %}{% endtablerow %}",
            "x",
            None,
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with(
                "subject: line 1: a range in a tablerow loop needs literal integer bounds"
            ),
            "{e}"
        );
        let e = Template::parse("s", "x", Some("\n{% for i in (n..3) %}{% endfor %}"))
            .err()
            .unwrap();
        assert!(
            e.starts_with("text_body: line 2: a range in a for loop"),
            "{e}"
        );
        // a literal range of 10001 values is fine, and so is an empty one
        let out = html(
            "{% for i in (1..10001) %}{% if forloop.last %}{{ i }}/{{ forloop.length }}{% endif %}{% endfor %}\
             {% for i in (5..1) %}x{% else %}none{% endfor %}",
            json!({}),
        )
        .unwrap();
        assert_eq!(out, "10001/10001none");
    }
}
