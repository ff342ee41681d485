//! Filters: `raw`, and bounded replacements of the standard `replace`,
//! `replace_first`, `join` and `uniq`.

use super::budget::{check_time, exceed, value_reason};
use super::MAX_OUTPUT_BYTES;
use liquid::model::{Value, ValueView};
use liquid_core::parser::{FilterArguments, ParameterReflection};
use liquid_core::{Expression, Filter, FilterReflection, ParseFilter, Runtime};
use std::fmt;

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
pub(super) struct RawFilter;

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
pub(super) struct ReplaceFilter {
    pub(super) first: bool,
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
pub(super) struct JoinFilter;

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
pub(super) struct UniqFilter;

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

#[cfg(test)]
mod tests {
    use crate::render::tests::{failure, html};
    use serde_json::json;

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
}
