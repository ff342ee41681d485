//! Liquid templates: parsed when defined, rendered with a context in which a
//! missing variable is nil (renders empty, so `| default:` works) instead of
//! an error, the way Shopify's Liquid, Customer.io and Braze behave.
//!
//! Two safety properties hold on top of plain Liquid:
//!
//! * **HTML bodies escape interpolated values by default.** In the html part,
//!   every `{{ expression }}` is HTML-escaped (`escape_once`, so text that is
//!   already escaped, e.g. by a `{% capture %}`, is not escaped twice) unless
//!   its filter chain names `raw`: `{{ body_html | raw }}`. `{% cycle %}` is
//!   escaped too. The subject and the text body are not HTML and are not
//!   escaped.
//! * **Templates cannot exhaust the server.** A render runs inside a
//!   PostgreSQL backend, where running out of memory aborts the whole process
//!   and a long loop cannot be cancelled, so it stops early: at
//!   [`MAX_OUTPUT_BYTES`] of output or of any one stored value, at
//!   [`MAX_ITERATIONS`] loop iterations and after [`MAX_RENDER_MILLIS`]. At
//!   parse time, ranges must be literal and short ([`MAX_RANGE_SPAN`]), and
//!   nesting, condition chains and filter chains are bounded so that neither
//!   the parser nor the renderer can overflow the stack.

use liquid::model::{
    ArrayView, DisplayCow, KStringCow, ObjectView, ScalarCow, State, Value, ValueCow, ValueView,
};
use liquid_core::error::{ResultLiquidExt, ResultLiquidReplaceExt};
use liquid_core::parser::{BlockElement, FilterArguments, ParameterReflection, TryMatchToken};
use liquid_core::runtime::{Interrupt, InterruptRegister, StackFrame};
use liquid_core::{
    BlockReflection, Expression, Filter, FilterReflection, Language, ParseBlock, ParseFilter,
    ParseTag, Renderable, Runtime, TagBlock, TagReflection, TagTokenIter,
};
use serde_json::Value as Json;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

/// Most bytes a message may render, all parts together; also the most any
/// single value built while rendering (`assign`, `capture`, a filter's
/// result) may hold.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Most wall-clock time one message's render may take.
pub const MAX_RENDER_MILLIS: u64 = 1000;
/// Most values one message's render may iterate: the items of every
/// `for`/`tablerow` loop run, nested loops included, plus any item of the
/// context's arrays that liquid iterates in place.
pub const MAX_ITERATIONS: u64 = 100_000;
/// A `for`/`tablerow` range `(a..b)` must have literal integer bounds with
/// `b - a` at most this much (checked when parsing: loops materialise their
/// items).
pub const MAX_RANGE_SPAN: i64 = 10_000;
/// Deepest nesting allowed at parse time: blocks inside blocks (each `elsif`
/// counts as one more level) and `[ ]` indexes inside a variable.
pub const MAX_NESTING: usize = 50;
/// Most `and`/`or` in one tag (liquid evaluates them recursively).
pub const MAX_CONDITION_TERMS: usize = 100;
/// Most filters in one filter chain (`x | f | g ...`).
pub const MAX_FILTERS_PER_CHAIN: usize = 30;
/// Bound on the sum, over every run of consecutive spaces and newlines in a
/// part, of the square of the run's length: liquid's parser looks ahead
/// across the whole run at every position of it, so its time grows with that
/// square.
pub const MAX_BLANK_WORK: u64 = 10_000_000;

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

/// The parser of the subject and text parts (`html == false`) or of the html
/// part (the same, but `{% cycle %}` output is HTML-escaped; `{{ }}` output
/// is escaped by [`escape_outputs`] before parsing).
fn parser(html: bool) -> &'static liquid::Parser {
    static TEXT: std::sync::OnceLock<liquid::Parser> = std::sync::OnceLock::new();
    static HTML: std::sync::OnceLock<liquid::Parser> = std::sync::OnceLock::new();
    let cell = if html { &HTML } else { &TEXT };
    cell.get_or_init(|| {
        liquid::ParserBuilder::with_stdlib()
            .tag(AbortTag)
            // bounded replacements of the standard tags, blocks and filters
            .tag(AssignTag)
            .tag(CycleTag { escape: html })
            .block(CaptureBlock)
            .block(IfChangedBlock)
            .block(ForBlock)
            .block(TableRowBlock)
            .filter(RawFilter)
            .filter(ReplaceFilter { first: false })
            .filter(ReplaceFilter { first: true })
            .filter(JoinFilter)
            .filter(UniqFilter)
            .build()
            .expect("the standard Liquid library builds")
    })
}

/// Marks an error raised by `{% abort %}` (Braze's abort_message): the
/// template decided that this message must not go out.
const ABORT: &str = "nudge-abort: ";
/// Marks a parse error raised by one of our limits, whose message is shown
/// as is (instead of as a syntax error).
const LIMIT: &str = "nudge-limit: ";

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

/// Parses one part; the error names the part and the line of `source`.
fn parse_part(part: &str, source: &str, html: bool) -> Result<liquid::Template, String> {
    let scan = scan(source).map_err(|e| format!("{part}: line {}: {}", e.line, e.message))?;
    // liquid panics on a few malformed sources, e.g. an unclosed
    // `{% raw %}` inside a `{% comment %}`
    let parse = |text: &str| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser(html).parse(text)))
            .unwrap_or_else(|_| {
                Err(liquid::Error::with_msg(
                    "the template parser gave up on this text (is a {% raw %} or \
                     {% comment %} left open?)",
                ))
            })
    };
    let parsed = if html {
        parse(&escape_outputs(source, &scan.outputs))
    } else {
        parse(source)
    };
    parsed.map_err(|e| {
        // The escaping only appends ` | escape_once` to valid outputs, on
        // their own line; still, describe the author's own text when it is
        // at fault.
        let e = if html {
            parse(source).err().unwrap_or(e)
        } else {
            e
        };
        format!("{part}: {}", describe(&e.to_string(), source))
    })
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
    match (line, flat.find(LIMIT)) {
        (Some(n), Some(i)) => {
            let message = &flat[i + LIMIT.len()..];
            let message = message.split(" from: ").next().unwrap_or(message);
            format!("line {n}: {}", message.trim())
        }
        (Some(n), None) => {
            let text = source.lines().nth(n.saturating_sub(1)).unwrap_or("").trim();
            format!("line {n}: syntax error near `{text}` ({flat})")
        }
        (None, _) => flat,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Template {
    pub fn parse(subject: &str, html: &str, text: Option<&str>) -> Result<Template, String> {
        Ok(Template {
            subject: parse_part("subject", subject, false)?,
            html: parse_part("html", html, true)?,
            text: text
                .map(|t| parse_part("text_body", t, false))
                .transpose()?,
        })
    }

    /// Renders with `context` (a JSON object whose keys are the template's
    /// globals), within [`MAX_OUTPUT_BYTES`], [`MAX_ITERATIONS`] and
    /// [`MAX_RENDER_MILLIS`].
    pub fn render(&self, context: &Json) -> Result<Rendered, RenderError> {
        self.render_within(context, Duration::from_millis(MAX_RENDER_MILLIS))
    }

    fn render_within(&self, context: &Json, time: Duration) -> Result<Rendered, RenderError> {
        let _budget = BudgetScope::start(time);
        let globals = Lax::from_json(context);
        let run = |part: &str, t: &liquid::Template| {
            let mut out = Sink::output();
            let result = t.render_to(&mut out, &globals);
            // A limit may have stopped the render without an error of its
            // own (an array that stopped yielding), or caused the error.
            if let Some(reason) = budget_exceeded() {
                return Err(RenderError::Failed(format!("{part}: {reason}")));
            }
            result.map_err(|e| {
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
            })?;
            Ok(out.into_string())
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

// ---------------------------------------------------------------------------
// The render budget

/// What one message's render may still use. Lives in a thread-local for the
/// duration of [`Template::render`], because liquid gives tags, filters and
/// the context's arrays no other shared state.
struct Budget {
    deadline: Instant,
    time: Duration,
    iterations: u64,
    output: usize,
    /// Why the render must stop; the first reason wins.
    exceeded: Option<String>,
}

thread_local! {
    static BUDGET: RefCell<Option<Budget>> = const { RefCell::new(None) };
}

/// Installs a fresh budget for one render and removes it when dropped, also
/// when the render fails or panics.
struct BudgetScope(Option<Budget>);

impl BudgetScope {
    fn start(time: Duration) -> BudgetScope {
        let budget = Budget {
            deadline: Instant::now() + time,
            time,
            iterations: 0,
            output: 0,
            exceeded: None,
        };
        BudgetScope(BUDGET.with(|b| b.borrow_mut().replace(budget)))
    }
}

impl Drop for BudgetScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        let _ = BUDGET.try_with(|b| *b.borrow_mut() = previous);
    }
}

/// Runs `f` on the current budget; `None` outside a render.
fn with_budget<R>(f: impl FnOnce(&mut Budget) -> R) -> Option<R> {
    BUDGET.with(|b| b.borrow_mut().as_mut().map(f))
}

fn budget_exceeded() -> Option<String> {
    with_budget(|b| b.exceeded.clone()).flatten()
}

fn iterations_reason() -> String {
    format!("template exceeded {MAX_ITERATIONS} loop iterations")
}

fn output_reason() -> String {
    format!("template output over {MAX_OUTPUT_BYTES} bytes")
}

fn value_reason(what: &str) -> String {
    format!("template built a value over {MAX_OUTPUT_BYTES} bytes in {what}")
}

/// Records that the render must stop (unless it already must) and returns
/// the reason as a liquid error.
fn exceed(reason: String) -> liquid_core::Error {
    let reason =
        with_budget(|b| b.exceeded.get_or_insert(reason.clone()).clone()).unwrap_or(reason);
    liquid_core::Error::with_msg(reason)
}

impl Budget {
    /// The reason to stop, if there is one now.
    fn stop(&mut self) -> Option<String> {
        if self.exceeded.is_none() && Instant::now() >= self.deadline {
            self.exceeded = Some(format!(
                "template took longer than {} ms",
                self.time.as_millis()
            ));
        }
        self.exceeded.clone()
    }
}

/// Fails once the deadline has passed or another limit was exceeded.
fn check_time() -> liquid_core::Result<()> {
    match with_budget(Budget::stop).flatten() {
        Some(reason) => Err(liquid_core::Error::with_msg(reason)),
        None => Ok(()),
    }
}

/// Spends `n` iterations; fails past [`MAX_ITERATIONS`] or the deadline.
fn spend_iterations(n: u64) -> liquid_core::Result<()> {
    let stop = with_budget(|b| {
        b.iterations = b.iterations.saturating_add(n);
        if b.iterations > MAX_ITERATIONS && b.exceeded.is_none() {
            b.exceeded = Some(iterations_reason());
        }
        b.stop()
    });
    match stop.flatten() {
        Some(reason) => Err(liquid_core::Error::with_msg(reason)),
        None => Ok(()),
    }
}

/// Spends `n` bytes of the message's output.
fn spend_output(n: usize) -> liquid_core::Result<()> {
    let over = with_budget(|b| {
        b.output = b.output.saturating_add(n);
        b.output > MAX_OUTPUT_BYTES
    });
    match over {
        Some(true) => Err(exceed(output_reason())),
        _ => Ok(()),
    }
}

/// Fails when a value about to be stored or passed on holds more than
/// [`MAX_OUTPUT_BYTES`].
fn check_value(value: &Value, what: impl FnOnce() -> String) -> liquid_core::Result<()> {
    if value_size(value, MAX_OUTPUT_BYTES) > MAX_OUTPUT_BYTES {
        return Err(exceed(value_reason(&what())));
    }
    Ok(())
}

/// The rendered size of `value`, plus one per array item or object entry
/// (so that arrays of empty strings count too); counting stops once past
/// `cap`.
fn value_size(value: &Value, cap: usize) -> usize {
    match value {
        Value::Scalar(s) => s.to_kstr().as_str().len(),
        Value::Array(items) => {
            let mut size = 0usize;
            for item in items {
                size = size.saturating_add(1 + value_size(item, cap));
                if size > cap {
                    break;
                }
            }
            size
        }
        Value::Object(entries) => {
            let mut size = 0usize;
            for (k, v) in entries.iter() {
                size = size.saturating_add(1 + k.len() + value_size(v, cap));
                if size > cap {
                    break;
                }
            }
            size
        }
        Value::State(_) | Value::Nil => 0,
    }
}

/// Where rendered text goes: the message's output (counted against the
/// message's output budget), or a value being built (`capture`), which may
/// hold at most [`MAX_OUTPUT_BYTES`]. Every write checks the deadline.
struct Sink {
    buf: Vec<u8>,
    /// `None` for the message's output, else what is being built.
    value: Option<String>,
}

impl Sink {
    fn output() -> Sink {
        Sink {
            buf: Vec::new(),
            value: None,
        }
    }

    fn value(what: String) -> Sink {
        Sink {
            buf: Vec::new(),
            value: Some(what),
        }
    }

    fn into_string(self) -> String {
        // liquid only writes UTF-8
        String::from_utf8(self.buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let io = |e: liquid_core::Error| std::io::Error::other(e.to_string());
        check_time().map_err(io)?;
        let over = self.buf.len().saturating_add(bytes.len()) > MAX_OUTPUT_BYTES;
        match &self.value {
            None => {
                spend_output(bytes.len()).map_err(io)?;
                if over {
                    return Err(io(exceed(output_reason())));
                }
            }
            Some(what) => {
                if over {
                    return Err(io(exceed(value_reason(what))));
                }
            }
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The context

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
    /// Every item yielded spends one of the render's [`MAX_ITERATIONS`];
    /// once the budget or the time is spent the iteration stops early and
    /// the render fails (see [`Template::render`]). (liquid 0.26 copies a
    /// variable's value, `to_value`, when a template reads it, so loops and
    /// filters mostly iterate that copy: `for` and `tablerow` spend the
    /// budget themselves.)
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        match self {
            Lax::Array(a) => Box::new(
                a.iter()
                    .take_while(|_| spend_iterations(1).is_ok())
                    .map(|v| v as &dyn ValueView),
            ),
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

// ---------------------------------------------------------------------------
// Tags and blocks

/// `{% abort "no stock left" %}` or `{% abort reason_variable %}`.
#[derive(Clone, Copy, Debug)]
struct AbortTag;

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
#[derive(Clone, Copy, Debug)]
struct AssignTag;

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
#[derive(Clone, Copy, Debug)]
struct CaptureBlock;

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
struct IfChangedBlock;

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
struct CycleTag {
    escape: bool,
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

/// liquid's `escape_once`: escapes `<>'"&`, leaving `&lt;`, `&gt;`, `&#39;`,
/// `&quot;` and `&amp;` as they are.
fn html_escape_once(s: &str) -> String {
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

/// The standard `{% for x in xs limit: n offset: n reversed %}...{% else %}
/// ...{% endfor %}`, spending the render's iteration budget per item and
/// checking the deadline at every iteration.
#[derive(Clone, Copy, Debug)]
struct ForBlock;

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
        let var_name = arguments
            .expect_next("Identifier expected.")?
            .expect_identifier()
            .into_result()?;
        arguments
            .expect_next("\"in\" expected.")?
            .expect_str("in")
            .into_result_custom_msg("\"in\" expected.")?;
        let source = parse_loop_source("for", &mut arguments)?;

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
struct TableRowBlock;

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
        let var_name = arguments
            .expect_next("Identifier expected.")?
            .expect_identifier()
            .into_result()?;
        arguments
            .expect_next("\"in\" expected.")?
            .expect_str("in")
            .into_result_custom_msg("\"in\" expected.")?;
        let source = parse_loop_source("tablerow", &mut arguments)?;

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

// ---------------------------------------------------------------------------
// Filters

/// The positional arguments of a filter call, between `min` and `max` of
/// them; named arguments are refused.
fn positional_args(
    mut args: FilterArguments<'_>,
    min: usize,
    max: usize,
) -> liquid_core::Result<Vec<Expression>> {
    if let Some((name, _)) = args.keyword.next() {
        return Err(liquid_core::Error::with_msg("Unexpected named argument")
            .context("argument", name.to_owned()));
    }
    let positional: Vec<Expression> = args.positional.by_ref().take(max + 1).collect();
    if positional.len() < min {
        return Err(
            liquid_core::Error::with_msg("Invalid number of arguments").context(
                "cause",
                format!("expected at least {min} positional argument(s)"),
            ),
        );
    }
    if positional.len() > max {
        return Err(
            liquid_core::Error::with_msg("Invalid number of positional arguments").context(
                "cause",
                format!("expected at most {max} positional argument(s)"),
            ),
        );
    }
    Ok(positional)
}

/// A filter argument read as text, as liquid's `str` arguments are.
fn text_arg(e: &Expression, runtime: &dyn Runtime) -> liquid_core::Result<liquid::model::KString> {
    Ok(e.evaluate(runtime)?.to_kstr().into_owned())
}

/// Fails when a filter's result would hold more than [`MAX_OUTPUT_BYTES`].
fn check_result_size(size: u128, filter: &str) -> liquid_core::Result<()> {
    if size > MAX_OUTPUT_BYTES as u128 {
        return Err(exceed(value_reason(&format!("`{filter}`"))));
    }
    Ok(())
}

fn invalid_input(cause: &str) -> liquid_core::Error {
    liquid_core::Error::with_msg("Invalid input").context("cause", cause.to_owned())
}

const NO_PARAMETERS: &[ParameterReflection] = &[];

/// `{{ html_body | raw }}`: outputs its input as is. In the html part, a
/// `raw` anywhere in an output's filter chain turns off its escaping.
#[derive(Clone, Copy, Debug)]
struct RawFilter;

impl FilterReflection for RawFilter {
    fn name(&self) -> &str {
        "raw"
    }
    fn description(&self) -> &str {
        "Outputs its input without HTML escaping (in the html part)."
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for RawFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        positional_args(args, 0, 0)?;
        Ok(Box::new(RawFilter))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

impl fmt::Display for RawFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raw")
    }
}

impl Filter for RawFilter {
    fn evaluate(
        &self,
        input: &dyn ValueView,
        _runtime: &dyn Runtime,
    ) -> liquid_core::Result<Value> {
        Ok(input.to_value())
    }
}

/// The standard `replace: search, replacement` and `replace_first: ...`,
/// which fail instead of building a result over [`MAX_OUTPUT_BYTES`].
#[derive(Clone, Copy, Debug)]
struct ReplaceFilter {
    first: bool,
}

static REPLACE_PARAMETERS: &[ParameterReflection] = &[
    ParameterReflection {
        name: "search",
        description: "The text to search.",
        is_optional: false,
    },
    ParameterReflection {
        name: "replace",
        description: "The text to replace it with; nothing if not given.",
        is_optional: true,
    },
];

impl FilterReflection for ReplaceFilter {
    fn name(&self) -> &str {
        if self.first {
            "replace_first"
        } else {
            "replace"
        }
    }
    fn description(&self) -> &str {
        if self.first {
            "Replaces the first occurrence of `search` with `replace`."
        } else {
            "Replaces every occurrence of `search` with `replace`."
        }
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        REPLACE_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for ReplaceFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        let mut args = positional_args(args, 1, 2)?.into_iter();
        Ok(Box::new(Replace {
            first: self.first,
            search: args.next().expect("one argument at least"),
            replace: args.next(),
        }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct Replace {
    first: bool,
    search: Expression,
    replace: Option<Expression>,
}

impl fmt::Display for Replace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.first {
            "replace_first"
        } else {
            "replace"
        };
        match &self.replace {
            Some(r) => write!(f, "{name}: {}, {r}", self.search),
            None => write!(f, "{name}: {}", self.search),
        }
    }
}

impl Filter for Replace {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        check_time()?;
        let search = text_arg(&self.search, runtime)?;
        let replace = match &self.replace {
            Some(r) => text_arg(r, runtime)?,
            None => "".into(),
        };
        let input = input.to_kstr();
        let (s, from, to) = (input.as_str(), search.as_str(), replace.as_str());
        if self.first {
            return Ok(Value::scalar(match s.find(from) {
                Some(i) => {
                    check_result_size((s.len() - from.len() + to.len()) as u128, "replace_first")?;
                    [&s[..i], to, &s[i + from.len()..]].concat()
                }
                None => s.to_owned(),
            }));
        }
        // an empty `search` matches between every two characters
        let matches = if from.is_empty() {
            s.chars().count() + 1
        } else {
            s.matches(from).count()
        } as u128;
        let size = s.len() as u128 - matches * from.len() as u128 + matches * to.len() as u128;
        check_result_size(size, "replace")?;
        Ok(Value::scalar(s.replace(from, to)))
    }
}

/// The standard `join: separator`, which fails instead of building a result
/// over [`MAX_OUTPUT_BYTES`].
#[derive(Clone, Copy, Debug)]
struct JoinFilter;

static JOIN_PARAMETERS: &[ParameterReflection] = &[ParameterReflection {
    name: "separator",
    description: "The separator between each element in the string; a space if not given.",
    is_optional: true,
}];

impl FilterReflection for JoinFilter {
    fn name(&self) -> &str {
        "join"
    }
    fn description(&self) -> &str {
        "Combines the items in an array into a single string using the argument as a separator."
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        JOIN_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for JoinFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        Ok(Box::new(Join(positional_args(args, 0, 1)?.pop())))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct Join(Option<Expression>);

impl fmt::Display for Join {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(s) => write!(f, "join: {s}"),
            None => f.write_str("join"),
        }
    }
}

impl Filter for Join {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        check_time()?;
        let separator = match &self.0 {
            Some(s) => text_arg(s, runtime)?,
            None => " ".into(),
        };
        let array = input
            .as_array()
            .ok_or_else(|| invalid_input("Array of strings expected"))?;
        let mut parts = Vec::new();
        let mut size = 0u128;
        for item in array.values() {
            let part = item.to_kstr();
            if !parts.is_empty() {
                size += separator.len() as u128;
            }
            size += part.as_str().len() as u128;
            check_result_size(size, "join")?;
            parts.push(part);
        }
        let mut joined = String::with_capacity(size as usize);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                joined.push_str(separator.as_str());
            }
            joined.push_str(part.as_str());
        }
        Ok(Value::scalar(joined))
    }
}

/// The standard `uniq`, which compares every item with every kept one: it
/// checks the deadline as it goes.
#[derive(Clone, Copy, Debug)]
struct UniqFilter;

impl FilterReflection for UniqFilter {
    fn name(&self) -> &str {
        "uniq"
    }
    fn description(&self) -> &str {
        "Removes any duplicate instances of elements in an array."
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for UniqFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        positional_args(args, 0, 0)?;
        Ok(Box::new(UniqFilter))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

impl fmt::Display for UniqFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("uniq")
    }
}

impl Filter for UniqFilter {
    fn evaluate(
        &self,
        input: &dyn ValueView,
        _runtime: &dyn Runtime,
    ) -> liquid_core::Result<Value> {
        use liquid::model::ValueViewCmp;
        let array = input
            .as_array()
            .ok_or_else(|| invalid_input("Array expected"))?;
        let mut kept: Vec<Value> = Vec::new();
        for item in array.values() {
            check_time()?;
            let item_cmp = ValueViewCmp::new(item);
            if !kept
                .iter()
                .any(|v| ValueViewCmp::new(v.as_view()) == item_cmp)
            {
                kept.push(item.to_value());
            }
        }
        Ok(Value::Array(kept))
    }
}

// ---------------------------------------------------------------------------
// Scanning a part's source: where the html part's outputs are, and the
// parse-time limits.
//
// The scanner splits the source into elements exactly as liquid's grammar
// does (liquid-core's grammar.pest, a PEG: `{{ }}` outputs, `{% %}` tags and
// the text between them, with the same lookaheads, literals and implicit
// whitespace), so that it finds the same `{{ }}` outputs and the same
// `{% raw %}` blocks as the parser that runs after it. Appending
// ` | escape_once` to a valid filter chain keeps it valid, and the text is
// inserted on the chain's own line, so line numbers in later errors do not
// move.

/// What scanning a part's source found.
struct Scan {
    /// The end of the filter chain of every `{{ }}` outside `{% raw %}` whose
    /// chain does not name `raw`, in order: where ` | escape_once` goes.
    outputs: Vec<usize>,
}

struct ScanError {
    line: usize,
    message: String,
}

/// `source` with ` | escape_once` inserted at each offset of `at` (sorted).
fn escape_outputs(source: &str, at: &[usize]) -> String {
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

/// liquid's WHITESPACE: a space or a newline (not a tab).
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r')
}

/// A filter chain the scanner matched.
struct Chain {
    /// Just after its last value, filter name or argument.
    end: usize,
    filters: usize,
    raw: bool,
}

/// A `{{ }}` the scanner matched.
struct Output {
    end: usize,
    chain: Chain,
}

/// A `{% %}` the scanner matched.
struct TagMatch<'s> {
    end: usize,
    name: &'s str,
    tokens: usize,
    conditions: usize,
    most_filters: usize,
}

struct Scanner<'s> {
    s: &'s [u8],
    /// Where a variable's `[ ]` indexes went deeper than [`MAX_NESTING`]
    /// (liquid's parser recurses per level).
    too_deep: Option<usize>,
}

impl<'s> Scanner<'s> {
    fn byte(&self, p: usize) -> Option<u8> {
        self.s.get(p).copied()
    }

    fn at(&self, p: usize, text: &str) -> bool {
        self.s
            .get(p..)
            .is_some_and(|rest| rest.starts_with(text.as_bytes()))
    }

    /// After `WHITESPACE*` from `p`.
    fn blanks(&self, mut p: usize) -> usize {
        while self.byte(p).is_some_and(is_blank) {
            p += 1;
        }
        p
    }

    fn text(&self, from: usize, to: usize) -> &'s str {
        std::str::from_utf8(&self.s[from..to]).unwrap_or("")
    }

    // Identifier = @{ (ASCII_ALPHA | "_" | NON_WHITESPACE_CONTROL_HYPHEN)
    //                 ~ (ASCII_ALPHANUMERIC | "_" | NON_WHITESPACE_CONTROL_HYPHEN)* }
    fn ident_char(&self, p: usize, first: bool) -> bool {
        match self.byte(p) {
            Some(b) if b.is_ascii_alphabetic() || b == b'_' => true,
            Some(b) if b.is_ascii_digit() => !first,
            Some(b'-') => !self.at(p, "-}}") && !self.at(p, "-%}"),
            _ => false,
        }
    }

    fn identifier(&self, p: usize) -> Option<usize> {
        if !self.ident_char(p, true) {
            return None;
        }
        let mut q = p + 1;
        while self.ident_char(q, false) {
            q += 1;
        }
        Some(q)
    }

    fn digits(&self, mut p: usize) -> usize {
        while self.byte(p).is_some_and(|b| b.is_ascii_digit()) {
            p += 1;
        }
        p
    }

    // Literal = { NilLiteral | EmptyLiteral | BlankLiteral | StringLiteral
    //             | FloatLiteral | IntegerLiteral | BooleanLiteral }
    // (the keywords match as prefixes: `nilly` is `nil` then `ly`)
    fn literal(&self, p: usize) -> Option<usize> {
        for keyword in ["nil", "null", "empty", "blank", "true", "false"] {
            if self.at(p, keyword) {
                return Some(p + keyword.len());
            }
        }
        if let Some(quote @ (b'"' | b'\'')) = self.byte(p) {
            if let Some(i) = self.s[p + 1..].iter().position(|&b| b == quote) {
                return Some(p + 1 + i + 1);
            }
            return None;
        }
        let mut q = p;
        if matches!(self.byte(q), Some(b'+' | b'-')) {
            q += 1;
        }
        let int_end = self.digits(q);
        if int_end == q {
            return None;
        }
        if self.byte(int_end) == Some(b'.') {
            let frac_end = self.digits(int_end + 1);
            if frac_end > int_end + 1 {
                return Some(frac_end);
            }
        }
        Some(int_end)
    }

    // Value = { Literal | Variable }
    fn value(&mut self, p: usize, depth: usize) -> Option<usize> {
        self.literal(p).or_else(|| self.variable(p, depth))
    }

    // Variable = ${ Identifier ~ ( ("." ~ Identifier)
    //             | ("[" ~ WHITESPACE* ~ Value ~ WHITESPACE* ~ "]") )* }
    fn variable(&mut self, p: usize, depth: usize) -> Option<usize> {
        let mut q = self.identifier(p)?;
        loop {
            if self.byte(q) == Some(b'.') {
                if let Some(r) = self.identifier(q + 1) {
                    q = r;
                    continue;
                }
            }
            if self.byte(q) == Some(b'[') {
                if depth >= MAX_NESTING {
                    self.too_deep.get_or_insert(q);
                    return None;
                }
                let r = self.blanks(q + 1);
                if let Some(r) = self.value(r, depth + 1) {
                    let r = self.blanks(r);
                    if self.byte(r) == Some(b']') {
                        q = r + 1;
                        continue;
                    }
                }
            }
            return Some(q);
        }
    }

    // FilterChain = { Value ~ ("|" ~ Filter)* }, with implicit whitespace
    fn filter_chain(&mut self, p: usize) -> Option<Chain> {
        let mut chain = Chain {
            end: self.value(p, 0)?,
            filters: 0,
            raw: false,
        };
        loop {
            let r = self.blanks(chain.end);
            if self.byte(r) != Some(b'|') {
                break;
            }
            let r = self.blanks(r + 1);
            let Some((end, name)) = self.filter(r) else {
                break;
            };
            chain.end = end;
            chain.filters += 1;
            chain.raw |= name == "raw";
        }
        Some(chain)
    }

    // Filter = { Identifier ~ (":" ~ FilterArgument ~ ("," ~ FilterArgument)*)? }
    fn filter(&mut self, p: usize) -> Option<(usize, &'s str)> {
        let name_end = self.identifier(p)?;
        let mut end = name_end;
        let r = self.blanks(end);
        if self.byte(r) == Some(b':') {
            let r = self.blanks(r + 1);
            if let Some(a) = self.filter_argument(r) {
                end = a;
                loop {
                    let r = self.blanks(end);
                    if self.byte(r) == Some(b',') {
                        let r = self.blanks(r + 1);
                        if let Some(a) = self.filter_argument(r) {
                            end = a;
                            continue;
                        }
                    }
                    break;
                }
            }
        }
        Some((end, self.text(p, name_end)))
    }

    // FilterArgument = _{ KeywordFilterArgument | PositionalFilterArgument }
    // KeywordFilterArgument = { Identifier ~ ":" ~ Value }
    fn filter_argument(&mut self, p: usize) -> Option<usize> {
        if let Some(i) = self.identifier(p) {
            let r = self.blanks(i);
            if self.byte(r) == Some(b':') {
                let r = self.blanks(r + 1);
                if let Some(v) = self.value(r, 0) {
                    return Some(v);
                }
            }
        }
        self.value(p, 0)
    }

    // Range = { "(" ~ Value ~ ".." ~ Value ~ ")" }
    fn range(&mut self, p: usize) -> Option<usize> {
        if self.byte(p) != Some(b'(') {
            return None;
        }
        let r = self.blanks(p + 1);
        let r = self.value(r, 0)?;
        let r = self.blanks(r);
        if !self.at(r, "..") {
            return None;
        }
        let r = self.blanks(r + 2);
        let r = self.value(r, 0)?;
        let r = self.blanks(r);
        (self.byte(r) == Some(b')')).then_some(r + 1)
    }

    // Expression = { ExpressionStart ~ WHITESPACE* ~ ExpressionInner
    //                ~ WHITESPACE* ~ ExpressionEnd }
    // ExpressionStart = _{ (WHITESPACE* ~ "{{-") | "{{" }
    // ExpressionEnd = _{ ("-}}" ~ WHITESPACE*) | "}}" }
    fn expression(&mut self, p: usize) -> Option<Output> {
        let b = self.blanks(p);
        let q = if self.at(b, "{{-") {
            b + 3
        } else if self.at(p, "{{") {
            p + 2
        } else {
            return None;
        };
        let q = self.blanks(q);
        let chain = self.filter_chain(q)?;
        let r = self.blanks(chain.end);
        let end = if self.at(r, "-}}") {
            self.blanks(r + 3)
        } else if self.at(r, "}}") {
            r + 2
        } else {
            return None;
        };
        Some(Output { end, chain })
    }

    // Tag = { TagStart ~ WHITESPACE* ~ TagInner ~ WHITESPACE* ~ TagEnd }
    // TagInner = !{ Identifier ~ TagToken* }
    // TagToken = _{ Range | FilterChain | DoubleCharSymbol | SingleCharSymbol }
    fn tag(&mut self, p: usize) -> Option<TagMatch<'s>> {
        let b = self.blanks(p);
        let q = if self.at(b, "{%-") {
            b + 3
        } else if self.at(p, "{%") {
            p + 2
        } else {
            return None;
        };
        let q = self.blanks(q);
        let name_end = self.identifier(q)?;
        let mut tag = TagMatch {
            end: name_end,
            name: self.text(q, name_end),
            tokens: 0,
            conditions: 0,
            most_filters: 0,
        };
        loop {
            let r = self.blanks(tag.end);
            let end = if let Some(end) = self.range(r) {
                end
            } else if let Some(chain) = self.filter_chain(r) {
                if matches!(self.text(r, chain.end), "and" | "or") {
                    tag.conditions += 1;
                }
                tag.most_filters = tag.most_filters.max(chain.filters);
                chain.end
            } else if ["==", "!=", "<>", ">=", "<="].iter().any(|s| self.at(r, s)) {
                r + 2
            } else if matches!(self.byte(r), Some(b'>' | b'<' | b'=' | b',' | b':')) {
                r + 1
            } else {
                break;
            };
            tag.end = end;
            tag.tokens += 1;
        }
        let r = self.blanks(tag.end);
        tag.end = if self.at(r, "-%}") {
            self.blanks(r + 3)
        } else if self.at(r, "%}") {
            r + 2
        } else {
            return None;
        };
        Some(tag)
    }

    // Raw = @{ (!(TagStart | ExpressionStart) ~ ANY)+ }: where the text from
    // `p` ends (`p` itself if an element may start there).
    fn text_end(&self, p: usize) -> usize {
        let mut q = p;
        while let Some(b) = self.byte(q) {
            if b == b'{' && (self.at(q, "{{") || self.at(q, "{%")) {
                break;
            }
            if is_blank(b) {
                // every blank of a run looks ahead to the same place
                let r = self.blanks(q);
                if self.at(r, "{{-") || self.at(r, "{%-") {
                    break;
                }
                q = r;
                continue;
            }
            q += 1;
        }
        q
    }
}

/// Scans a part: finds its outputs and enforces the parse-time limits.
fn scan(source: &str) -> Result<Scan, ScanError> {
    let s = source.as_bytes();
    let line = |at: usize| 1 + s[..at.min(s.len())].iter().filter(|&&b| b == b'\n').count();
    let error = |at: usize, message: String| ScanError {
        line: line(at),
        message,
    };

    // liquid's parser looks ahead over a whole run of blanks at each of its
    // positions
    let mut work = 0u64;
    let mut run = 0u64;
    for (i, &b) in s.iter().chain(std::iter::once(&b'.')).enumerate() {
        if is_blank(b) {
            run += 1;
            continue;
        }
        work = work.saturating_add(run * run);
        run = 0;
        if work > MAX_BLANK_WORK {
            return Err(error(
                i,
                "too many consecutive spaces and blank lines for the template parser; \
                 shorten the runs of blank space"
                    .into(),
            ));
        }
    }

    let mut scanner = Scanner { s, too_deep: None };
    let too_deep = |at: usize| {
        error(
            at,
            format!("a variable is indexed more than {MAX_NESTING} levels deep"),
        )
    };
    let mut outputs = Vec::new();
    let mut in_raw = false;
    // the open blocks, each with how many levels it holds (`elsif` adds one)
    let mut blocks: Vec<usize> = Vec::new();
    let mut depth = 0;
    let mut p = 0;
    while p < s.len() {
        if let Some(output) = scanner.expression(p) {
            if let Some(at) = scanner.too_deep {
                return Err(too_deep(at));
            }
            if !in_raw {
                if output.chain.filters > MAX_FILTERS_PER_CHAIN {
                    return Err(error(
                        p,
                        format!("more than {MAX_FILTERS_PER_CHAIN} filters in one output"),
                    ));
                }
                if !output.chain.raw {
                    outputs.push(output.chain.end);
                }
            }
            p = output.end;
            continue;
        }
        if let Some(at) = scanner.too_deep {
            return Err(too_deep(at));
        }
        if let Some(tag) = scanner.tag(p) {
            if let Some(at) = scanner.too_deep {
                return Err(too_deep(at));
            }
            if in_raw {
                in_raw = !(tag.name == "endraw" && tag.tokens == 0);
            } else {
                if tag.most_filters > MAX_FILTERS_PER_CHAIN {
                    return Err(error(
                        p,
                        format!("more than {MAX_FILTERS_PER_CHAIN} filters in one tag"),
                    ));
                }
                if tag.conditions > MAX_CONDITION_TERMS {
                    return Err(error(
                        p,
                        format!("more than {MAX_CONDITION_TERMS} `and`/`or` in one tag"),
                    ));
                }
                match tag.name {
                    "raw" if tag.tokens == 0 => in_raw = true,
                    "if" | "unless" | "case" | "for" | "tablerow" | "capture" | "comment"
                    | "ifchanged" => {
                        blocks.push(1);
                        depth += 1;
                    }
                    "elsif" => {
                        if let Some(levels) = blocks.last_mut() {
                            *levels += 1;
                            depth += 1;
                        }
                    }
                    name if name.starts_with("end") => depth -= blocks.pop().unwrap_or(0),
                    _ => {}
                }
                if depth > MAX_NESTING {
                    return Err(error(
                        p,
                        format!(
                            "blocks nested more than {MAX_NESTING} deep \
                             (each elsif counts as one more)"
                        ),
                    ));
                }
            }
            p = tag.end;
            continue;
        }
        if let Some(at) = scanner.too_deep {
            return Err(too_deep(at));
        }
        let q = scanner.text_end(p);
        // not an element: liquid takes one character as invalid liquid
        p = if q > p { q } else { p + 1 };
    }
    Ok(Scan { outputs })
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

    fn html(source: &str, context: Json) -> Result<String, RenderError> {
        Template::parse("s", source, None)
            .unwrap_or_else(|e| panic!("{source:?} does not parse: {e}"))
            .render(&context)
            .map(|r| r.html)
    }

    fn failure(source: &str, context: Json) -> String {
        match html(source, context) {
            Err(RenderError::Failed(m)) => m,
            other => panic!("{source:?} should fail, got {other:?}"),
        }
    }

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

    #[test]
    fn output_over_the_limit_fails_quickly() {
        let ctx =
            json!({"event": {"blob": "x".repeat(1000), "items": (0..1000).collect::<Vec<_>>()}});
        let start = Instant::now();
        let e = failure(
            "{% for i in (1..10000) %}{{ event.blob }}{% endfor %}",
            ctx.clone(),
        );
        assert_eq!(e, "html: template output over 1048576 bytes");
        let e = failure(
            "{% for i in event.items %}{% for j in event.items %}{{ event.blob }}{% endfor %}{% endfor %}",
            ctx.clone(),
        );
        assert!(e.ends_with("output over 1048576 bytes"), "{e}");
        // the limit is for the whole message
        let half = "{% for i in (1..600) %}{{ event.blob }}{% endfor %}";
        let e = Template::parse(half, half, None)
            .unwrap()
            .render(&ctx)
            .unwrap_err();
        assert_eq!(
            e,
            RenderError::Failed("html: template output over 1048576 bytes".into())
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        // below the limit all is well
        assert_eq!(html(half, ctx).unwrap().len(), 600_000);
    }

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
    fn context_arrays_spend_the_iteration_budget() {
        let big = Lax::from_json(&json!(vec![1; 150_000]));
        // outside a render nothing is counted
        assert_eq!(ArrayView::values(&big).count(), 150_000);
        let budget = BudgetScope::start(Duration::from_secs(60));
        assert_eq!(ArrayView::values(&big).count() as u64, MAX_ITERATIONS);
        assert_eq!(budget_exceeded(), Some(iterations_reason()));
        assert_eq!(ArrayView::values(&big).count(), 0);
        drop(budget);
        assert_eq!(budget_exceeded(), None);
    }

    #[test]
    fn renders_stop_at_the_deadline() {
        let t = Template::parse("s", "{% for i in (1..3) %}{% endfor %}", None).unwrap();
        assert_eq!(
            t.render_within(&json!({}), Duration::ZERO).unwrap_err(),
            RenderError::Failed("subject: template took longer than 0 ms".into())
        );
        assert!(t.render(&json!({})).is_ok());
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

    #[test]
    fn growing_a_value_fails_instead_of_allocating() {
        let start = Instant::now();
        let e = failure(
            "{% assign s = 'ab' %}{% for i in (1..64) %}{% assign s = s | append: s %}{% endfor %}{{ s | size }}",
            json!({}),
        );
        assert_eq!(
            e,
            "html: template built a value over 1048576 bytes in `{% assign s %}`"
        );
        let e = failure(
            "{% capture s %}ab{% endcapture %}{% for i in (1..64) %}{% capture s %}{{ s | raw }}{{ s | raw }}{% endcapture %}{% endfor %}",
            json!({}),
        );
        assert_eq!(
            e,
            "html: template built a value over 1048576 bytes in `{% capture s %}`"
        );
        // arrays too
        let e = failure(
            "{% assign a = 'x' | split: ',' %}{% for i in (1..64) %}{% assign a = a | concat: a %}{% endfor %}",
            json!({}),
        );
        assert!(e.contains("in `{% assign a %}`"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn multiplying_filters_are_bounded() {
        let ctx = json!({"blob": "x".repeat(2000), "items": vec!["a"; 1000]});
        let e = failure("{{ blob | replace: 'x', blob | size }}", ctx.clone());
        assert_eq!(
            e,
            "html: template built a value over 1048576 bytes in `replace`"
        );
        let e = failure("{{ blob | replace: '', blob | size }}", ctx.clone());
        assert!(e.ends_with("in `replace`"), "{e}");
        let e = failure("{{ items | join: blob | size }}", ctx.clone());
        assert!(e.ends_with("in `join`"), "{e}");
        // the standard behaviour otherwise
        assert_eq!(
            html(
                "{{ 'a-b-c' | replace: '-', '+' }} {{ 'a-b-c' | replace: '-' }} \
                 {{ 'a-b-c' | replace_first: '-', '+' }} {{ 'abc' | replace: '', '.' }} \
                 {{ items | join | size }} {{ 'b,a,b' | split: ',' | uniq | join: ',' }} \
                 {{ 'abc' | replace_first: 'z', 'y' }}",
                ctx
            )
            .unwrap(),
            "a+b+c abc a+b-c .a.b.c. 1999 b,a abc"
        );
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
    fn parse_time_limits() {
        let nested = |n: usize| "{% if x %}".repeat(n) + &"{% endif %}".repeat(n);
        assert!(Template::parse("s", &nested(10), None).is_ok());
        let e = Template::parse("s", &format!("\n{}", nested(60)), None)
            .err()
            .unwrap();
        assert!(
            e.starts_with("html: line 2: blocks nested more than 50 deep"),
            "{e}"
        );
        let elsifs = format!("{{% if a %}}{}{{% endif %}}", "{% elsif a %}".repeat(60));
        assert!(Template::parse("s", &elsifs, None).is_err());
        let ifs = "{% if a %}{% endif %}".repeat(1000);
        assert!(Template::parse("s", &ifs, None).is_ok());
        let index = format!("{{{{ {}x{} }}}}", "a[".repeat(60), "]".repeat(60));
        let e = Template::parse(&index, "x", None).err().unwrap();
        assert!(
            e.starts_with("subject: line 1: a variable is indexed more than 50"),
            "{e}"
        );
        let ands = format!("{{% if a{} %}}{{% endif %}}", " and a".repeat(200));
        let e = Template::parse("s", &ands, None).err().unwrap();
        assert!(e.contains("more than 100 `and`/`or`"), "{e}");
        let chain = format!("{{{{ a{} }}}}", " | append: a".repeat(40));
        let e = Template::parse("s", &chain, None).err().unwrap();
        assert!(e.contains("more than 30 filters"), "{e}");
        let blank = format!("a{}b", " ".repeat(5000));
        let e = Template::parse("s", &blank, None).err().unwrap();
        assert!(
            e.starts_with("html: line 1: too many consecutive spaces"),
            "{e}"
        );
        let indented = "  <p>\n    {{ x }}\n  </p>\n".repeat(2000);
        assert!(Template::parse("s", &indented, None).is_ok());
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
}
