//! Dates in templates. Timestamps reach a template as PostgreSQL and JSON
//! write them (`2026-12-04T10:00:00+00:00` from `to_jsonb`, `2026-12-04
//! 10:00:00+00` as text, `2026-12-04` for a date), forms that liquid's own
//! `date` filter does not read. `date` here reads those and liquid's own,
//! and formats with strftime in the time's own offset; `in_time_zone`
//! moves a time into a zone (the recipient's, `profile.timezone`, when none
//! is named), so that `{{ event.trial_ends_at | in_time_zone | date: "%b %d" }}`
//! prints the recipient's local date.

use super::budget::check_time;
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone};
use liquid::model::{ScalarCow, Value, ValueView};
use liquid_core::parser::{FilterArguments, ParameterReflection};
use liquid_core::{Expression, Filter, FilterReflection, ParseFilter, Runtime};
use std::fmt;

/// A time as text, in any of the forms PostgreSQL, JSON and liquid write.
pub fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t);
    }
    // PostgreSQL's text: a space for the T, an offset of +HH, +HH:MM or +HHMM
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t);
        }
    }
    let utc = FixedOffset::east_opt(0).expect("UTC");
    // a timestamp without a zone, or a date: UTC, as the server writes them
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return utc.from_local_datetime(&t).single();
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return utc.from_local_datetime(&d.and_hms_opt(0, 0, 0)?).single();
    }
    if let Ok(secs) = s.parse::<i64>() {
        return utc.timestamp_opt(secs, 0).single();
    }
    // liquid's own forms ("now", "16 February 2016 10:00:00 +0100", ...)
    let t = liquid::model::Scalar::new(s.to_string()).to_date_time()?;
    let offset = FixedOffset::east_opt(t.offset().whole_seconds())?;
    offset
        .timestamp_opt(t.unix_timestamp(), t.nanosecond())
        .single()
}

fn input_time(input: &dyn ValueView) -> Option<DateTime<FixedOffset>> {
    let scalar = input.as_scalar()?;
    if let Some(t) = scalar.to_date_time() {
        let offset = FixedOffset::east_opt(t.offset().whole_seconds())?;
        return offset
            .timestamp_opt(t.unix_timestamp(), t.nanosecond())
            .single();
    }
    parse_time(scalar.to_kstr().as_str())
}

const NO_PARAMETERS: &[ParameterReflection] = &[];

static DATE_PARAMETERS: &[ParameterReflection] = &[ParameterReflection {
    name: "format",
    description: "The strftime format, e.g. \"%b %d\".",
    is_optional: false,
}];

static ZONE_PARAMETERS: &[ParameterReflection] = &[ParameterReflection {
    name: "zone",
    description: "An IANA time zone; the recipient's (profile.timezone) if not given.",
    is_optional: true,
}];

fn one_optional(
    mut args: FilterArguments<'_>,
    required: bool,
    name: &str,
) -> liquid_core::Result<Option<Expression>> {
    if let Some((k, _)) = args.keyword.next() {
        return Err(liquid_core::Error::with_msg("Unexpected named argument")
            .context("argument", k.to_owned()));
    }
    let a: Vec<Expression> = args.positional.by_ref().take(2).collect();
    match (a.len(), required) {
        (0, true) => Err(liquid_core::Error::with_msg(format!(
            "`{name}` needs one argument"
        ))),
        (0 | 1, _) => Ok(a.into_iter().next()),
        _ => Err(liquid_core::Error::with_msg(format!(
            "`{name}` takes one argument"
        ))),
    }
}

/// `{{ t | date: "%b %d" }}`.
#[derive(Clone, Copy, Debug)]
pub(super) struct DateFilter;

impl FilterReflection for DateFilter {
    fn name(&self) -> &str {
        "date"
    }
    fn description(&self) -> &str {
        "Formats a time (PostgreSQL's, JSON's or liquid's forms) with strftime."
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        DATE_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for DateFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        let format = one_optional(args, true, "date")?.expect("required");
        Ok(Box::new(Date { format }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct Date {
    format: Expression,
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "date: {}", self.format)
    }
}

impl Filter for Date {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        check_time()?;
        let format = self.format.evaluate(runtime)?.to_kstr().into_owned();
        // not a time, or an empty format: the input as it is (liquid's way)
        let Some(t) = input_time(input).filter(|_| !format.is_empty()) else {
            return Ok(input.to_value());
        };
        Ok(Value::scalar(strftime(&t, format.as_str())?))
    }
}

/// chrono's strftime, refusing a format it cannot write (it would panic in
/// the middle of a message otherwise).
fn strftime(t: &DateTime<FixedOffset>, format: &str) -> liquid_core::Result<String> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(liquid_core::Error::with_msg("Invalid date format")
            .context("format", format.to_owned()));
    }
    let mut out = String::new();
    fmt::write(
        &mut out,
        format_args!("{}", t.format_with_items(items.into_iter())),
    )
    .map_err(|_| {
        liquid_core::Error::with_msg("Invalid date format").context("format", format.to_owned())
    })?;
    Ok(out)
}

/// `{{ t | in_time_zone }}` (the recipient's zone) or `in_time_zone: "Europe/Berlin"`.
#[derive(Clone, Copy, Debug)]
pub(super) struct InTimeZoneFilter;

impl FilterReflection for InTimeZoneFilter {
    fn name(&self) -> &str {
        "in_time_zone"
    }
    fn description(&self) -> &str {
        "The same instant in a time zone (the recipient's when none is named)."
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        ZONE_PARAMETERS
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        NO_PARAMETERS
    }
}

impl ParseFilter for InTimeZoneFilter {
    fn parse(&self, args: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        Ok(Box::new(InTimeZone {
            zone: one_optional(args, false, "in_time_zone")?,
        }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct InTimeZone {
    zone: Option<Expression>,
}

impl fmt::Display for InTimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.zone {
            Some(z) => write!(f, "in_time_zone: {z}"),
            None => f.write_str("in_time_zone"),
        }
    }
}

impl Filter for InTimeZone {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        let zone = match &self.zone {
            Some(z) => Some(z.evaluate(runtime)?.to_kstr().into_owned()),
            None => runtime
                .try_get(&[ScalarCow::new("profile"), ScalarCow::new("timezone")])
                .filter(|v| !v.is_nil())
                .map(|v| v.to_kstr().into_owned()),
        };
        // a date (no time of day) is the same date in every zone
        if input
            .as_scalar()
            .is_some_and(|s| NaiveDate::parse_from_str(s.to_kstr().trim(), "%Y-%m-%d").is_ok())
        {
            return Ok(input.to_value());
        }
        let Some(t) = input_time(input) else {
            return Ok(input.to_value());
        };
        let Some(zone) = zone.filter(|z| !z.is_empty()) else {
            return Ok(Value::scalar(t.to_rfc3339()));
        };
        let tz: chrono_tz::Tz = zone.as_str().parse().map_err(|_| {
            liquid_core::Error::with_msg("Unknown time zone").context("zone", zone.to_string())
        })?;
        Ok(Value::scalar(
            t.with_timezone(&tz).fixed_offset().to_rfc3339(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_in_the_forms_postgres_json_and_liquid_write() {
        let expect = |s: &str, rfc: &str| {
            assert_eq!(
                parse_time(s).map(|t| t.to_rfc3339()).as_deref(),
                Some(rfc),
                "{s}"
            );
        };
        expect("2026-12-04T10:00:00+00:00", "2026-12-04T10:00:00+00:00");
        expect("2026-12-04T10:00:00.5Z", "2026-12-04T10:00:00.500+00:00");
        expect("2026-12-04 10:00:00+00", "2026-12-04T10:00:00+00:00");
        expect(
            "2026-12-04 10:00:00.123+05:30",
            "2026-12-04T10:00:00.123+05:30",
        );
        expect("2026-12-04 10:00:00", "2026-12-04T10:00:00+00:00");
        expect("2026-12-04", "2026-12-04T00:00:00+00:00");
        expect("1764842400", "2025-12-04T10:00:00+00:00");
        expect("2016-02-16 10:00:00 +0100", "2016-02-16T10:00:00+01:00");
        assert_eq!(parse_time("next tuesday"), None);
        assert_eq!(parse_time(""), None);
    }

    #[test]
    fn a_timestamp_from_postgres_prints_in_the_recipients_zone() {
        let t = crate::render::Template::parse(
            r#"Trial ends {{ event.trial_ends_at | in_time_zone | date: "%b %d" }}"#,
            r#"<p>{{ event.trial_ends_at | date: "%Y-%m-%d %H:%M" }} UTC, {{ event.trial_ends_at | in_time_zone: "Asia/Tokyo" | date: "%H:%M %z" }} in Tokyo, {{ event.plan | date: "%b" }}</p>"#,
            None,
        )
        .unwrap();
        let context = |zone: serde_json::Value| {
            serde_json::json!({"event": {"trial_ends_at": "2026-12-03T23:30:00+00:00", "plan": "gold"},
                               "profile": {"timezone": zone}})
        };
        let r = t
            .render(&context(serde_json::json!("Europe/Berlin")))
            .unwrap();
        assert_eq!(r.subject, "Trial ends Dec 04", "00:30 on the 4th in Berlin");
        assert_eq!(
            r.html,
            "<p>2026-12-03 23:30 UTC, 08:30 +0900 in Tokyo, gold</p>"
        );
        let r = t
            .render(&context(serde_json::json!("America/New_York")))
            .unwrap();
        assert_eq!(r.subject, "Trial ends Dec 03");
        // no zone known: the time's own
        let r = t.render(&context(serde_json::Value::Null)).unwrap();
        assert_eq!(r.subject, "Trial ends Dec 03");
        let bad = crate::render::Template::parse(
            r#"{{ event.trial_ends_at | in_time_zone: "Mars/Olympus" }}"#,
            "x",
            None,
        )
        .unwrap()
        .render(&context(serde_json::Value::Null));
        assert!(bad.is_err());
    }

    #[test]
    fn local_time_moves_across_a_dst_change() {
        let berlin = |s: &str| {
            crate::render::Template::parse(
                &format!(r#"{{{{ "{s}" | in_time_zone: "Europe/Berlin" | date: "%H:%M %Z" }}}}"#),
                "x",
                None,
            )
            .unwrap()
            .render(&serde_json::json!({}))
            .unwrap()
            .subject
        };
        assert_eq!(berlin("2026-03-28 09:00:00+00"), "10:00 +01:00");
        assert_eq!(berlin("2026-03-29 09:00:00+00"), "11:00 +02:00");
    }

    #[test]
    fn a_date_is_the_same_date_in_every_zone() {
        let t = crate::render::Template::parse(
            r#"{{ event.ends | in_time_zone | date: "%b %d" }}"#,
            "x",
            None,
        )
        .unwrap();
        let r = t
            .render(&serde_json::json!({"event": {"ends": "2026-03-10"},
                                        "profile": {"timezone": "America/New_York"}}))
            .unwrap();
        assert_eq!(r.subject, "Mar 10");
    }
}
