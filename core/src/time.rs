//! Durations written as Postgres interval text (`'24 hours'`, `'1 day 2 hours'`,
//! `'00:05:00'`), read into fixed microseconds. Months and years have no fixed
//! length, so they are refused instead of guessed.

pub const SECOND: i64 = 1_000_000;

/// Microseconds from the Unix epoch to Postgres' (2000-01-01 UTC).
pub const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// A Postgres timestamp (microseconds since 2000-01-01 UTC) as UTC text.
pub fn format_pg_utc(pg_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(pg_us + PG_EPOCH_UNIX_US).map_or_else(
        || format!("{pg_us}us"),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// A duration in words, rounded down to its largest unit: "9 hours", "3 days".
/// The span of event times pg_nudge captures: 1900-01-01 to the end of
/// 9999, in microseconds since 2000-01-01 UTC. Outside it (infinity, a year
/// 200000) adding a wait or a window leaves PostgreSQL's timestamp range and
/// a journey could never be scheduled: such an event is refused by
/// `nudge.track` and left out by capture, instead of failing later passes.
pub const FIRST_EVENT_TIME: i64 = -3_155_673_600_000_000;
pub const LAST_EVENT_TIME: i64 = 252_455_615_999_999_999;

pub fn is_event_time(pg_us: i64) -> bool {
    (FIRST_EVENT_TIME..=LAST_EVENT_TIME).contains(&pg_us)
}

pub fn format_duration(us: i64) -> String {
    let s = us.max(0) / SECOND;
    let (n, unit) = if s >= 86_400 {
        (s / 86_400, "day")
    } else if s >= 3_600 {
        (s / 3_600, "hour")
    } else if s >= 60 {
        (s / 60, "minute")
    } else {
        (s, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

pub fn parse_duration(text: &str) -> Result<i64, String> {
    let s = text.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err("empty duration; write e.g. '24 hours' or '5 minutes'".into());
    }
    let mut total: i64 = 0;
    let mut words = s.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if w.contains(':') {
            total = add(total, clock(w)?)?;
            continue;
        }
        // "5m" and "5 minutes" both work
        let split = w
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
            .unwrap_or(w.len());
        let (num, unit) = w.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{text}': expected a number before '{w}'"))?;
        let unit = if unit.is_empty() {
            words.next().ok_or_else(|| {
                format!("'{text}': '{num}' needs a unit (seconds, minutes, hours, days, weeks)")
            })?
        } else {
            unit
        };
        total = add(total, (n * unit_micros(unit, text)? as f64).round() as i64)?;
    }
    if total < 0 {
        return Err(format!("'{text}': must not be negative"));
    }
    Ok(total)
}

fn add(a: i64, b: i64) -> Result<i64, String> {
    a.checked_add(b)
        .ok_or_else(|| "duration out of range".to_string())
}

fn unit_micros(unit: &str, text: &str) -> Result<i64, String> {
    Ok(match unit.trim_end_matches(',') {
        "us" | "usec" | "usecs" | "microsecond" | "microseconds" => 1,
        "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 1_000,
        "s" | "sec" | "secs" | "second" | "seconds" => SECOND,
        "m" | "min" | "mins" | "minute" | "minutes" => 60 * SECOND,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600 * SECOND,
        "d" | "day" | "days" => 86_400 * SECOND,
        "w" | "week" | "weeks" => 7 * 86_400 * SECOND,
        "mon" | "mons" | "month" | "months" | "y" | "year" | "years" => {
            return Err(format!(
                "'{text}': months and years have no fixed length; write days or weeks"
            ))
        }
        other => {
            return Err(format!(
                "'{text}': unknown unit '{other}' (use seconds, minutes, hours, days, weeks)"
            ))
        }
    })
}

/// `HH:MM` or `HH:MM:SS[.ffffff]`, as Postgres reads a time-of-day interval.
fn clock(w: &str) -> Result<i64, String> {
    let parts: Vec<&str> = w.split(':').collect();
    let bad = || format!("'{w}': expected HH:MM or HH:MM:SS");
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let h: i64 = parts[0].parse().map_err(|_| bad())?;
    let m: i64 = parts[1].parse().map_err(|_| bad())?;
    let s: f64 = parts
        .get(2)
        .map_or(Ok(0.0), |s| s.parse())
        .map_err(|_| bad())?;
    Ok(h * 3_600 * SECOND + m * 60 * SECOND + (s * SECOND as f64).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_stay_where_waits_can_be_added() {
        assert!(is_event_time(0));
        assert!(is_event_time(FIRST_EVENT_TIME) && is_event_time(LAST_EVENT_TIME));
        assert!(!is_event_time(i64::MIN) && !is_event_time(i64::MAX)); // -infinity, infinity
        assert!(!is_event_time(FIRST_EVENT_TIME - 1) && !is_event_time(LAST_EVENT_TIME + 1));
    }

    #[test]
    fn formats_postgres_timestamps() {
        assert_eq!(format_pg_utc(0), "2000-01-01 00:00:00 UTC");
        assert_eq!(
            format_pg_utc(86_400 * SECOND + 61 * SECOND),
            "2000-01-02 00:01:01 UTC"
        );
    }

    #[test]
    fn reads_what_postgres_reads() {
        assert_eq!(parse_duration("24 hours"), Ok(86_400 * SECOND));
        assert_eq!(parse_duration("5 minutes"), Ok(300 * SECOND));
        assert_eq!(parse_duration("1 day 2 hours"), Ok(93_600 * SECOND));
        assert_eq!(parse_duration("00:05:00"), Ok(300 * SECOND));
        assert_eq!(parse_duration("1.5 hours"), Ok(5_400 * SECOND));
        assert_eq!(parse_duration("90s"), Ok(90 * SECOND));
        assert_eq!(parse_duration("0 seconds"), Ok(0));
        assert_eq!(parse_duration("2 Weeks"), Ok(14 * 86_400 * SECOND));
    }

    #[test]
    fn refuses_what_has_no_fixed_length_or_no_meaning() {
        assert!(parse_duration("1 month")
            .unwrap_err()
            .contains("no fixed length"));
        assert!(parse_duration("24 hourz")
            .unwrap_err()
            .contains("unknown unit 'hourz'"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("24").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("-1 hour").is_err());
        assert!(parse_duration("").is_err());
    }
}
