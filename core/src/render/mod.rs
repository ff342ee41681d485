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

mod budget;
pub(crate) mod dates;
mod escape;
mod filters;
mod grammar;
mod lax;
mod loops;
mod parse_limits;
mod scan;
mod tags;
#[cfg(test)]
mod tests;

use budget::{budget_exceeded, BudgetScope, Sink};
use escape::escape_outputs;
use filters::{JoinFilter, RawFilter, ReplaceFilter, UniqFilter};
use lax::Lax;
use loops::{ForBlock, TableRowBlock};
use scan::scan;
use serde_json::Value as Json;
use std::time::Duration;
use tags::{AbortTag, AssignTag, CaptureBlock, CycleTag, IfChangedBlock};

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
    /// Where the html part's author-written links point (tracking).
    link_origins: Vec<String>,
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
            // timestamps as PostgreSQL writes them, and the recipient's zone
            .filter(dates::DateFilter)
            .filter(dates::InTimeZoneFilter)
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
            link_origins: crate::tracking::author_origins(html),
        })
    }

    /// The origins of the links written into the html part (not interpolated).
    pub fn link_origins(&self) -> &[String] {
        &self.link_origins
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
            subject: one_header_line(&run("subject", &self.subject)?),
            html: run("html", &self.html)?,
            text: self
                .text
                .as_ref()
                .map(|t| run("text_body", t))
                .transpose()?,
        })
    }
}

/// A subject is one header line: line breaks (from a template or from a
/// value an end user wrote) become spaces, so that nothing rendered can add
/// a header of its own to the mail.
fn one_header_line(s: &str) -> String {
    s.split(|c: char| c == '\r' || c == '\n')
        .filter(|part| !part.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}
