//! Journeys due at a date the entry event carries ("3 days before the trial
//! ends", a birthday every year), at a local time in the recipient's zone, so
//! that a send at 09:00 stays at 09:00 across a change of daylight saving
//! time. See docs/reference.md, "Date entry".

use crate::policy::Clock;
use crate::time::{parse_duration, PG_EPOCH_UNIX_US};
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

/// The `on` keys of a date entry, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct DateEntry {
    /// The props field (dotted path) with the date or timestamp.
    pub path: Vec<String>,
    /// Whole days move the local date; the rest is added to the local time.
    pub offset_days: i64,
    pub offset_us: i64,
    /// The local time of the send; default the timestamp's own local time,
    /// 09:00 for a date.
    pub at: Option<NaiveTime>,
    pub every_year: bool,
}

const DAY_US: i64 = 86_400_000_000;
/// A date without a time goes at this local time unless `at` says otherwise.
pub const DEFAULT_TIME: (u32, u32) = (9, 0);

impl DateEntry {
    pub fn compile(
        date: &str,
        offset: Option<&str>,
        at: Option<&str>,
        every: Option<&str>,
    ) -> Result<DateEntry, String> {
        let path: Vec<String> = date.split('.').map(str::to_owned).collect();
        if path.iter().any(|p| p.trim().is_empty()) {
            return Err(
                "on.date: expected the props field with the date, such as \"trial_ends_at\"".into(),
            );
        }
        let (offset_days, offset_us) = match offset.map(str::trim) {
            None => (0, 0),
            Some(o) => {
                let (sign, text) = match o.strip_prefix('-') {
                    Some(rest) => (-1, rest),
                    None => (1, o.strip_prefix('+').unwrap_or(o)),
                };
                let us = parse_duration(text).map_err(|e| format!("on.offset: {e}"))?;
                (sign * (us / DAY_US), sign * (us % DAY_US))
            }
        };
        let at = at
            .map(|a| Clock::parse(a, "on.at").map(|c| c.time()))
            .transpose()?;
        if every == Some("year") && offset_days.abs() >= 365 {
            return Err("on.offset: a yearly date moves by less than a year".into());
        }
        let every_year = match every {
            None => false,
            Some("year") => true,
            Some(other) => {
                return Err(format!(
                    "on.every: {other:?} is not a recurrence (\"year\": birthdays, anniversaries)"
                ))
            }
        };
        Ok(DateEntry {
            path,
            offset_days,
            offset_us,
            at,
            every_year,
        })
    }

    /// The date the props carry, if they carry one that reads as a date
    /// from 1900 to 9999 (the event times capture takes).
    pub fn value<'a>(&self, props: &'a Value) -> Option<&'a str> {
        crate::predicate::lookup(props, &self.path)?
            .as_str()
            .filter(|s| {
                let year = match read(s) {
                    Some(Read::Date(d)) => d.year(),
                    Some(Read::Time(t)) => t.year(),
                    None => return false,
                };
                (1900..=9999).contains(&year)
            })
    }

    /// Whether the props carry a date this entry can be due at (in any zone:
    /// tested in UTC, whose due time is within a day of every other's).
    pub fn enters(&self, props: &Value) -> bool {
        self.value(props).is_some() && self.due(props, Tz::UTC, 0).is_some()
    }

    /// When a journey that entered at `entered_at` (PostgreSQL microseconds)
    /// with these props is due, in zone `tz`: the date (its next anniversary
    /// after `entered_at` when yearly), moved by the offset, at the local time.
    pub fn due(&self, props: &Value, tz: Tz, entered_at: i64) -> Option<i64> {
        let (date, time) = match read(self.value(props)?)? {
            Read::Date(d) => (d, None),
            Read::Time(t) => {
                let local = t.with_timezone(&tz);
                (local.date_naive(), Some(local.time()))
            }
        };
        let time = self.at.or(time).unwrap_or_else(|| {
            NaiveTime::from_hms_opt(DEFAULT_TIME.0, DEFAULT_TIME.1, 0).expect("09:00")
        });
        // a date out of PostgreSQL's range (or an event's: 1900 to 9999)
        // has no due time, and the event does not enter
        let on = |d: NaiveDate| -> Option<i64> {
            let day = d.checked_add_signed(Duration::days(self.offset_days))?;
            let local = day
                .and_time(time)
                .checked_add_signed(Duration::microseconds(self.offset_us))?;
            let due = from_local(local, tz)?.timestamp_micros() - PG_EPOCH_UNIX_US;
            crate::time::is_event_time(due).then_some(due)
        };
        if !self.every_year {
            return on(date);
        }
        let after = DateTime::<Utc>::from_timestamp_micros(entered_at + PG_EPOCH_UNIX_US)?
            .with_timezone(&tz)
            .year();
        // the year of entry may be too late (or early) by the offset: look
        // at the years around it, the first due after the entry wins
        (after - 2..=after + 2)
            .filter_map(|y| anniversary(date, y))
            .filter_map(on)
            .find(|due| *due > entered_at)
    }
}

enum Read {
    Date(NaiveDate),
    Time(DateTime<chrono::FixedOffset>),
}

fn read(s: &str) -> Option<Read> {
    let s = s.trim();
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(Read::Date(d));
    }
    crate::render::dates::parse_time(s).map(Read::Time)
}

/// The date's month and day in `year` (29 February: the 28th in other years).
fn anniversary(d: NaiveDate, year: i32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(year, d.month(), d.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, d.month(), d.day() - 1))
}

/// A local time as an instant: in the hour a DST change skips, the same
/// wall time an hour later; in the hour it repeats, the first.
fn from_local(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Tz>> {
    tz.from_local_datetime(&local).earliest().or_else(|| {
        tz.from_local_datetime(&(local + Duration::hours(1)))
            .earliest()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pg(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros() - PG_EPOCH_UNIX_US
    }

    fn berlin() -> Tz {
        "Europe/Berlin".parse().unwrap()
    }

    #[test]
    fn three_days_before_at_nine_local_across_the_dst_change() {
        // Berlin leaves winter time on 2026-03-29 at 02:00
        let e = DateEntry::compile("trial_ends_at", Some("-3 days"), Some("09:00"), None).unwrap();
        let props = json!({"trial_ends_at": "2026-03-31T12:00:00+00:00"});
        // 28 March, 09:00 CET (+01:00)
        assert_eq!(e.due(&props, berlin(), 0), Some(pg("2026-03-28T08:00:00Z")));
        let later = json!({"trial_ends_at": "2026-04-02T12:00:00+00:00"});
        // 30 March, 09:00 CEST (+02:00): the same local hour, an hour earlier in UTC
        assert_eq!(e.due(&later, berlin(), 0), Some(pg("2026-03-30T07:00:00Z")));
    }

    #[test]
    fn a_timestamp_keeps_its_local_time_and_a_date_goes_at_nine() {
        let e = DateEntry::compile("ends", Some("-1 day"), None, None).unwrap();
        // 10:00 Berlin on 30 March (CEST); a day earlier is 10:00 CEST on the
        // 29th, the day of the change: 08:00 UTC, not 24 hours earlier (09:00)
        let props = json!({"ends": "2026-03-30T08:00:00Z"});
        assert_eq!(e.due(&props, berlin(), 0), Some(pg("2026-03-29T08:00:00Z")));
        let date = json!({"ends": "2026-07-10"});
        assert_eq!(e.due(&date, berlin(), 0), Some(pg("2026-07-09T07:00:00Z")));
        assert_eq!(e.due(&json!({"ends": null}), berlin(), 0), None);
        assert_eq!(e.due(&json!({"ends": "soon"}), berlin(), 0), None);
    }

    #[test]
    fn every_year_is_the_next_birthday_after_the_entry() {
        let e = DateEntry::compile("birthday", None, Some("09:00"), Some("year")).unwrap();
        let props = json!({"birthday": "1990-06-15"});
        let tz: Tz = "America/New_York".parse().unwrap();
        let entered = pg("2026-07-01T00:00:00Z");
        assert_eq!(e.due(&props, tz, entered), Some(pg("2027-06-15T13:00:00Z")));
        let before = pg("2026-06-15T12:59:59Z");
        assert_eq!(e.due(&props, tz, before), Some(pg("2026-06-15T13:00:00Z")));
        // after this year's, the next year's
        let at = pg("2026-06-15T13:00:00Z");
        assert_eq!(e.due(&props, tz, at), Some(pg("2027-06-15T13:00:00Z")));
        // 29 February in a year without one
        let leap = json!({"birthday": "2000-02-29"});
        assert_eq!(
            e.due(&leap, Tz::UTC, entered),
            Some(pg("2027-02-28T09:00:00Z"))
        );
    }

    #[test]
    fn a_date_out_of_range_has_no_due_time() {
        let e = DateEntry::compile("d", Some("12 hours"), None, None).unwrap();
        for v in [
            "-5000-01-01",
            "+262143-12-31",
            "-300000000000",
            "9999-12-31T23:00:00Z",
        ] {
            let props = json!({ "d": v });
            assert!(
                e.value(&props).is_none() || e.due(&props, berlin(), 0).is_none(),
                "{v}"
            );
        }
        let plus = DateEntry::compile("d", Some("1 day"), None, None).unwrap();
        assert_eq!(plus.due(&json!({"d": "9999-12-31"}), Tz::UTC, 0), None);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(DateEntry::compile("", None, None, None)
            .unwrap_err()
            .starts_with("on.date:"));
        assert!(DateEntry::compile("d", Some("-3 months"), None, None)
            .unwrap_err()
            .starts_with("on.offset:"));
        assert!(DateEntry::compile("d", None, Some("9am"), None)
            .unwrap_err()
            .starts_with("on.at:"));
        assert!(DateEntry::compile("d", None, None, Some("month"))
            .unwrap_err()
            .starts_with("on.every:"));
    }
}
