//! The context: the JSON a template is rendered with, seen by Liquid in a way
//! that makes every missing key nil.

use super::budget::spend_iterations;
use liquid::model::{
    ArrayView, DisplayCow, KStringCow, ObjectView, ScalarCow, State, Value, ValueView,
};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;

/// A JSON tree seen by Liquid, in which every missing key is nil.
#[derive(Debug)]
pub(super) enum Lax {
    Nil,
    Scalar(Value),
    Array(Vec<Lax>),
    Object(BTreeMap<String, Lax>),
}

static NIL: Lax = Lax::Nil;

impl Lax {
    pub(super) fn from_json(v: &Json) -> Lax {
        match v {
            Json::Null => Lax::Nil,
            Json::Array(a) => Lax::Array(a.iter().map(Lax::from_json).collect()),
            Json::Object(m) => Lax::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Lax::from_json(v)))
                    .collect(),
            ),
            Json::Bool(b) => Lax::Scalar(Value::scalar(*b)),
            Json::String(s) => Lax::Scalar(Value::scalar(s.clone())),
            Json::Number(n) => Lax::Scalar(number(n)),
        }
    }
}

/// Numbers keep their JSON text (serde_json's `arbitrary_precision`), so one
/// beyond f64 still renders; Liquid gets an integer, a float, or that text
/// (an integer wider than i64 keeps every digit).
fn number(n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        return Value::scalar(i);
    }
    let text = n.to_string();
    if !text.contains(['.', 'e', 'E']) {
        return Value::scalar(text);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() => Value::scalar(f),
        _ => Value::scalar(n.to_string()),
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
    ///
    /// [`Template::render`]: super::Template::render
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::budget::{budget_exceeded, iterations_reason, BudgetScope};
    use crate::render::MAX_ITERATIONS;
    use serde_json::json;
    use std::time::Duration;

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
}
