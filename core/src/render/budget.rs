//! The render budget: what one message's render may still use (output,
//! iterations, time), the [`Sink`] every render writes to, and the size
//! check of the values a render builds.

use super::{MAX_ITERATIONS, MAX_OUTPUT_BYTES};
use liquid::model::{Value, ValueView};
use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

/// What one message's render may still use. Lives in a thread-local for the
/// duration of [`Template::render`], because liquid gives tags, filters and
/// the context's arrays no other shared state.
///
/// [`Template::render`]: super::Template::render
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
pub(super) struct BudgetScope(Option<Budget>);

impl BudgetScope {
    pub(super) fn start(time: Duration) -> BudgetScope {
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

pub(super) fn budget_exceeded() -> Option<String> {
    with_budget(|b| b.exceeded.clone()).flatten()
}

pub(super) fn iterations_reason() -> String {
    format!("template exceeded {MAX_ITERATIONS} loop iterations")
}

fn output_reason() -> String {
    format!("template output over {MAX_OUTPUT_BYTES} bytes")
}

pub(super) fn value_reason(what: &str) -> String {
    format!("template built a value over {MAX_OUTPUT_BYTES} bytes in {what}")
}

/// Records that the render must stop (unless it already must) and returns
/// the reason as a liquid error.
pub(super) fn exceed(reason: String) -> liquid_core::Error {
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
pub(super) fn check_time() -> liquid_core::Result<()> {
    match with_budget(Budget::stop).flatten() {
        Some(reason) => Err(liquid_core::Error::with_msg(reason)),
        None => Ok(()),
    }
}

/// Spends `n` iterations; fails past [`MAX_ITERATIONS`] or the deadline.
pub(super) fn spend_iterations(n: u64) -> liquid_core::Result<()> {
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
pub(super) fn check_value(value: &Value, what: impl FnOnce() -> String) -> liquid_core::Result<()> {
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
pub(super) struct Sink {
    buf: Vec<u8>,
    /// `None` for the message's output, else what is being built.
    value: Option<String>,
}

impl Sink {
    pub(super) fn output() -> Sink {
        Sink {
            buf: Vec::new(),
            value: None,
        }
    }

    pub(super) fn value(what: String) -> Sink {
        Sink {
            buf: Vec::new(),
            value: Some(what),
        }
    }

    pub(super) fn into_string(self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{failure, html};
    use crate::render::{RenderError, Template};
    use serde_json::json;

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
    fn renders_stop_at_the_deadline() {
        let t = Template::parse("s", "{% for i in (1..3) %}{% endfor %}", None).unwrap();
        assert_eq!(
            t.render_within(&json!({}), Duration::ZERO).unwrap_err(),
            RenderError::Failed("subject: template took longer than 0 ms".into())
        );
        assert!(t.render(&json!({})).is_ok());
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
}
