//! Send-time policies that need no server: quiet hours and send windows in
//! the recipient's time zone, frequency caps, and priority arbitration.
//! Times are Postgres microseconds (since 2000-01-01 UTC), as everywhere in core.

use crate::decision::{Rule, Stop};
use crate::time::PG_EPOCH_UNIX_US;
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
    Weekday,
};
pub use chrono_tz::Tz;
use serde::Deserialize;
use std::collections::HashMap;

pub type Micros = i64;

/// `"21:00"`-style local time of day.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Clock(NaiveTime);

impl Clock {
    pub fn time(self) -> NaiveTime {
        self.0
    }

    pub fn parse(s: &str, at: &str) -> Result<Clock, String> {
        NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map(Clock)
            .map_err(|_| format!("{at}: expected a local time HH:MM such as \"21:00\", got {s:?}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursSpec {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendWindowSpec {
    #[serde(default)]
    pub days: Option<Vec<String>>,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
}

/// When a message may go out, in the recipient's local time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    /// No sending from `.0` until `.1` (may span midnight).
    pub quiet: Option<(Clock, Clock)>,
    /// Sending only on these days ...
    pub days: Option<Vec<Weekday>>,
    /// ... and only between these times.
    pub hours: Option<(Clock, Clock)>,
}

impl Schedule {
    pub fn compile(
        quiet: Option<&QuietHoursSpec>,
        window: Option<&SendWindowSpec>,
    ) -> Result<Schedule, String> {
        let quiet = quiet
            .map(|q| -> Result<_, String> {
                let (s, e) = (
                    Clock::parse(&q.start, "quiet_hours.start")?,
                    Clock::parse(&q.end, "quiet_hours.end")?,
                );
                if s == e {
                    return Err("quiet_hours: start and end are the same time".into());
                }
                Ok((s, e))
            })
            .transpose()?;
        let mut days = None;
        let mut hours = None;
        if let Some(w) = window {
            if let Some(list) = &w.days {
                let parsed = list
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        d.parse::<Weekday>().map_err(|_| {
                            format!("send_window.days[{i}]: expected a day such as \"mon\" or \"monday\", got {d:?}")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if parsed.is_empty() {
                    return Err("send_window.days: must name at least one day".into());
                }
                days = Some(parsed);
            }
            match (&w.start, &w.end) {
                (Some(s), Some(e)) => {
                    let (s, e) = (
                        Clock::parse(s, "send_window.start")?,
                        Clock::parse(e, "send_window.end")?,
                    );
                    if s >= e {
                        return Err(
                            "send_window: start must be before end (use quiet_hours for nights)"
                                .into(),
                        );
                    }
                    hours = Some((s, e));
                }
                (None, None) => {}
                _ => return Err("send_window: give both start and end, or neither".into()),
            }
            if days.is_none() && hours.is_none() {
                return Err("send_window: give days, or start and end".into());
            }
        }
        Ok(Schedule { quiet, days, hours })
    }

    pub fn is_empty(&self) -> bool {
        self.quiet.is_none() && self.days.is_none() && self.hours.is_none()
    }

    fn allows(&self, local: NaiveDateTime) -> bool {
        let t = local.time();
        let quiet = self.quiet.is_some_and(|(s, e)| {
            if s.0 < e.0 {
                t >= s.0 && t < e.0
            } else {
                t >= s.0 || t < e.0
            }
        });
        let day_ok = self
            .days
            .as_ref()
            .is_none_or(|d| d.contains(&local.weekday()));
        let hours_ok = self.hours.is_none_or(|(s, e)| t >= s.0 && t < e.0);
        !quiet && day_ok && hours_ok
    }

    /// The first local instant at or after `local` that the schedule allows.
    fn next_local(&self, local: NaiveDateTime) -> NaiveDateTime {
        // Candidates are `local` itself and the boundaries where sending may
        // start again (end of quiet hours, start of the window) on the
        // following days; the earliest allowed one wins.
        let mut candidates = vec![local];
        for day in 0..9 {
            let date: NaiveDate = local.date() + Duration::days(day);
            if let Some((_, e)) = self.quiet {
                candidates.push(date.and_time(e.0));
            }
            if let Some((s, _)) = self.hours {
                candidates.push(date.and_time(s.0));
            }
            candidates.push(date.and_time(NaiveTime::MIN));
        }
        candidates
            .into_iter()
            .filter(|c| *c >= local && self.allows(*c))
            .min()
            .unwrap_or(local)
    }

    /// When a message due at `due` may go out for a recipient in `tz`.
    /// A local time that a DST change skips moves to the first instant after
    /// the gap; a repeated one takes its first occurrence.
    pub fn next_allowed(&self, due: Micros, tz: Tz) -> Micros {
        if self.is_empty() {
            return due;
        }
        let utc = to_utc(due);
        let local = utc.with_timezone(&tz).naive_local();
        let next = self.next_local(local);
        if next == local {
            return due;
        }
        let resolved = match tz.from_local_datetime(&next) {
            LocalResult::Single(t) => t,
            LocalResult::Ambiguous(first, _) => first,
            LocalResult::None => {
                // in a spring-forward gap: walk forward a minute at a time to its end
                let mut probe = next;
                loop {
                    probe += Duration::minutes(1);
                    if let LocalResult::Single(t) | LocalResult::Ambiguous(t, _) =
                        tz.from_local_datetime(&probe)
                    {
                        // the gap's end: the first valid minute, back to its start
                        break t - Duration::seconds(t.timestamp() % 60);
                    }
                }
            }
        };
        from_utc(resolved.with_timezone(&Utc)).max(due)
    }
}

/// The recipient's zone: the profile's, else the default, else UTC.
pub fn zone(profile_tz: Option<&str>, default_tz: Option<&str>) -> Tz {
    profile_tz
        .and_then(|z| z.parse::<Tz>().ok())
        .or_else(|| default_tz.and_then(|z| z.parse::<Tz>().ok()))
        .unwrap_or(Tz::UTC)
}

/// The zone of a profile (its `timezone`), else the default, else UTC.
pub fn profile_zone(profile: Option<&serde_json::Value>, default_tz: Option<&str>) -> Tz {
    zone(
        profile
            .and_then(|p| p.get("timezone"))
            .and_then(serde_json::Value::as_str),
        default_tz,
    )
}

impl Schedule {
    /// When a message due at `due` may go, for a recipient with `profile`.
    pub fn send_time(
        &self,
        due: Micros,
        profile: Option<&serde_json::Value>,
        default_tz: Option<&str>,
    ) -> Micros {
        self.next_allowed(due, profile_zone(profile, default_tz))
    }
}

fn to_utc(us: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us + PG_EPOCH_UNIX_US).unwrap_or_default()
}

fn from_utc(t: DateTime<Utc>) -> Micros {
    t.timestamp_micros() - PG_EPOCH_UNIX_US
}

/// Local wall-clock text of `us` in `tz`, for the journal.
pub fn local_text(us: Micros, tz: Tz) -> String {
    to_utc(us)
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M %Z")
        .to_string()
}

/// `{"max": 1, "per": "16 hours"}`: at most `max` messages per `per`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapSpec {
    pub max: u32,
    pub per: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cap {
    pub max: u32,
    pub per_us: Micros,
    /// For the journal: the rule as written and where it comes from.
    pub label: String,
}

impl Cap {
    pub fn compile(spec: &CapSpec, at: &str, scope: &str) -> Result<Cap, String> {
        let per_us =
            crate::time::parse_duration(&spec.per).map_err(|e| format!("{at}.per: {e}"))?;
        if per_us == 0 {
            return Err(format!("{at}.per: must be longer than zero"));
        }
        Ok(Cap {
            max: spec.max,
            per_us,
            label: format!("{} per {} ({scope})", spec.max, spec.per),
        })
    }

    /// Whether one more message at `at` keeps every window of the cap within
    /// it, given the send times of the messages that count: the window that
    /// ends at `at`, and those that end at each later message it would share
    /// a window with (a message decided earlier may go out later, after
    /// quiet hours).
    pub fn allows(&self, at: Micros, sent: &[Micros]) -> bool {
        let within = |end: Micros| {
            sent.iter()
                .filter(|s| **s > end - self.per_us && **s <= end)
                .count() as u32
        };
        std::iter::once(at)
            .chain(
                sent.iter()
                    .copied()
                    .filter(|s| *s > at && *s < at + self.per_us),
            )
            .all(|end| within(end) < self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(utc: &str) -> Micros {
        from_utc(
            NaiveDateTime::parse_from_str(utc, "%Y-%m-%d %H:%M")
                .unwrap()
                .and_utc(),
        )
    }
    fn utc(us: Micros) -> String {
        to_utc(us).format("%Y-%m-%d %H:%M").to_string()
    }
    fn quiet(s: &str, e: &str) -> Schedule {
        Schedule::compile(
            Some(&QuietHoursSpec {
                start: s.into(),
                end: e.into(),
            }),
            None,
        )
        .unwrap()
    }
    const NY: Tz = chrono_tz::America::New_York;

    #[test]
    fn outside_quiet_hours_nothing_moves() {
        let s = quiet("21:00", "08:00");
        // 15:00 UTC = 10:00 in New York (EST)
        assert_eq!(
            utc(s.next_allowed(at("2026-01-15 15:00"), NY)),
            "2026-01-15 15:00"
        );
    }

    #[test]
    fn quiet_hours_over_midnight_defer_to_their_end() {
        let s = quiet("21:00", "08:00");
        // 03:00 UTC = 22:00 EST the evening before: next 08:00 EST = 13:00 UTC
        assert_eq!(
            utc(s.next_allowed(at("2026-01-15 03:00"), NY)),
            "2026-01-15 13:00"
        );
        // 10:00 UTC = 05:00 EST: same morning
        assert_eq!(
            utc(s.next_allowed(at("2026-01-15 10:00"), NY)),
            "2026-01-15 13:00"
        );
    }

    #[test]
    fn spring_forward_night_lands_on_local_eight() {
        // 2026-03-08: New York goes from 02:00 EST to 03:00 EDT. Due 06:30 UTC
        // = 01:30 EST, in quiet hours; 08:00 EDT that morning is 12:00 UTC.
        let s = quiet("21:00", "08:00");
        assert_eq!(
            utc(s.next_allowed(at("2026-03-08 06:30"), NY)),
            "2026-03-08 12:00"
        );
    }

    #[test]
    fn an_end_inside_the_skipped_hour_moves_to_the_gap_end() {
        // quiet until 02:30, which does not exist on 2026-03-08 in New York:
        // the first instant after the gap is 03:00 EDT = 07:00 UTC.
        let s = quiet("22:00", "02:30");
        assert_eq!(
            utc(s.next_allowed(at("2026-03-08 06:10"), NY)),
            "2026-03-08 07:00"
        );
    }

    #[test]
    fn an_end_inside_the_repeated_hour_takes_its_first_occurrence() {
        // 2026-11-01: 01:00-02:00 happens twice in New York. Quiet until 01:30:
        // the first 01:30 is EDT, 05:30 UTC.
        let s = quiet("22:00", "01:30");
        assert_eq!(
            utc(s.next_allowed(at("2026-11-01 04:00"), NY)),
            "2026-11-01 05:30"
        );
    }

    #[test]
    fn send_window_moves_to_the_next_allowed_day_and_hour() {
        let s = Schedule::compile(
            None,
            Some(&SendWindowSpec {
                days: Some(vec![
                    "mon".into(),
                    "tue".into(),
                    "wed".into(),
                    "thu".into(),
                    "fri".into(),
                ]),
                start: Some("09:00".into()),
                end: Some("17:00".into()),
            }),
        )
        .unwrap();
        // Saturday 2026-01-17 12:00 UTC (07:00 EST) -> Monday 09:00 EST = 14:00 UTC
        assert_eq!(
            utc(s.next_allowed(at("2026-01-17 12:00"), NY)),
            "2026-01-19 14:00"
        );
        // Tuesday 18:00 EST -> Wednesday 09:00 EST
        assert_eq!(
            utc(s.next_allowed(at("2026-01-20 23:00"), NY)),
            "2026-01-21 14:00"
        );
        // inside: unchanged
        assert_eq!(
            utc(s.next_allowed(at("2026-01-21 16:00"), NY)),
            "2026-01-21 16:00"
        );
    }

    #[test]
    fn schedules_are_validated_with_paths() {
        let e = Schedule::compile(
            Some(&QuietHoursSpec {
                start: "9pm".into(),
                end: "08:00".into(),
            }),
            None,
        )
        .unwrap_err();
        assert!(
            e.starts_with("quiet_hours.start: expected a local time HH:MM"),
            "{e}"
        );
        let w = SendWindowSpec {
            days: Some(vec!["funday".into()]),
            start: None,
            end: None,
        };
        assert!(Schedule::compile(None, Some(&w))
            .unwrap_err()
            .starts_with("send_window.days[0]"));
        let w = SendWindowSpec {
            days: None,
            start: Some("18:00".into()),
            end: Some("09:00".into()),
        };
        assert!(Schedule::compile(None, Some(&w))
            .unwrap_err()
            .contains("start must be before end"));
    }

    #[test]
    fn zones_fall_back() {
        assert_eq!(zone(Some("Europe/Berlin"), None), chrono_tz::Europe::Berlin);
        assert_eq!(
            zone(Some("Mars/Olympus"), Some("Asia/Tokyo")),
            chrono_tz::Asia::Tokyo
        );
        assert_eq!(zone(None, None), Tz::UTC);
    }

    #[test]
    fn caps_count_a_sliding_window() {
        let cap = Cap::compile(
            &CapSpec {
                max: 2,
                per: "1 day".into(),
            },
            "caps[0]",
            "global",
        )
        .unwrap();
        let h = 3_600_000_000;
        assert!(
            cap.allows(30 * h, &[0, 10 * h]),
            "the message at 0 has left the window"
        );
        assert!(!cap.allows(20 * h, &[0, 10 * h]));
        assert!(cap.allows(20 * h, &[10 * h]));
        assert_eq!(cap.label, "2 per 1 day (global)");
    }
}

/// Database-wide policy settings (`nudge.configure`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSpec {
    /// Caps over every non-transactional message of a user, e.g. Klaviyo's
    /// smart sending as `[{"max": 1, "per": "16 hours"}]`.
    #[serde(default)]
    pub caps: Option<Vec<CapSpec>>,
    /// Messages of one user due within this of each other compete by priority.
    #[serde(default)]
    pub arbitration_window: Option<String>,
    /// The zone of recipients whose profile names none (else UTC).
    #[serde(default)]
    pub default_timezone: Option<String>,
    /// Where one-click unsubscribe links point: `<url>/u/<token>` (the
    /// gateway's address, https). Without it messages carry no https link.
    #[serde(default)]
    pub unsubscribe_url: Option<String>,
    /// An address for `List-Unsubscribe: <mailto:...>`, the token as subject.
    #[serde(default)]
    pub unsubscribe_mailto: Option<String>,
    /// Where tracked opens and clicks go (`<url>/o/…`, `<url>/c/…`): the
    /// gateway's address; `unsubscribe_url` when left out.
    #[serde(default)]
    pub tracking_url: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub caps: Vec<Cap>,
    pub arbitration_us: Micros,
    /// No arbitration_window configured: messages of one user due at the same
    /// instant still compete, by priority alone (equal priorities both go),
    /// so that `priority` in a definition works without another setting.
    pub same_instant_only: bool,
    pub default_timezone: Option<String>,
    pub unsubscribe_url: Option<String>,
    pub unsubscribe_mailto: Option<String>,
    pub tracking_url: Option<String>,
}

impl Settings {
    /// The gateway address tracked links point at, if any.
    pub fn tracking_base(&self) -> Option<&str> {
        self.tracking_url
            .as_deref()
            .or(self.unsubscribe_url.as_deref())
    }

    /// Parses and validates; errors name the JSON path.
    pub fn parse(v: &serde_json::Value) -> Result<(SettingsSpec, Settings), String> {
        if !v.is_object() {
            return Err("settings: expected a JSON object with keys caps, arbitration_window, default_timezone".into());
        }
        let spec: SettingsSpec = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })?;
        let settings = Settings::compile(&spec)?;
        Ok((spec, settings))
    }

    pub fn compile(spec: &SettingsSpec) -> Result<Settings, String> {
        let caps = spec
            .caps
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, c)| Cap::compile(c, &format!("caps[{i}]"), "global"))
            .collect::<Result<_, _>>()?;
        let arbitration_us = spec
            .arbitration_window
            .as_deref()
            .map_or(Ok(0), crate::time::parse_duration)
            .map_err(|e| format!("arbitration_window: {e}"))?;
        if let Some(z) = &spec.default_timezone {
            z.parse::<Tz>()
                .map_err(|_| format!("default_timezone: unknown time zone {z:?}"))?;
        }
        // both go into headers and html attributes as they are
        if let Some(u) = &spec.unsubscribe_url {
            if !(u.starts_with("https://") || u.starts_with("http://"))
                || u.contains(|c: char| c.is_whitespace() || "\"'<>".contains(c))
            {
                return Err(format!(
                    "unsubscribe_url: {u:?} is not an http(s) URL (RFC 8058 wants https)"
                ));
            }
        }
        if let Some(u) = &spec.tracking_url {
            if !(u.starts_with("https://") || u.starts_with("http://"))
                || u.contains(|c: char| c.is_whitespace() || "\"'<>".contains(c))
            {
                return Err(format!("tracking_url: {u:?} is not an http(s) URL"));
            }
        }
        if let Some(m) = &spec.unsubscribe_mailto {
            if !m.contains('@') || m.contains(|c: char| c.is_whitespace() || "<>,?".contains(c)) {
                return Err(format!("unsubscribe_mailto: {m:?} is not an email address"));
            }
        }
        Ok(Settings {
            caps,
            arbitration_us,
            same_instant_only: spec.arbitration_window.is_none(),
            default_timezone: spec.default_timezone.clone(),
            unsubscribe_url: spec.unsubscribe_url.clone(),
            unsubscribe_mailto: spec.unsubscribe_mailto.clone(),
            tracking_url: spec.tracking_url.clone(),
        })
    }
}

/// A message that is ready to go, before caps and arbitration.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub user: &'a str,
    pub key: &'a str,
    pub trigger: &'a str,
    pub priority: i32,
    /// The anchor event's time: among equal priorities the most recent wins.
    pub entered_at: Micros,
    /// When the message was due: caps are granted in this order, the order in
    /// which a live engine decides, whatever quiet hours do to `send_at`.
    pub due_at: Micros,
    pub send_at: Micros,
    pub transactional: bool,
    pub defer_on_conflict: bool,
    pub caps: &'a [Cap],
}

/// A message already in the outbox that caps and arbitration count.
#[derive(Debug, Clone)]
pub struct Sent {
    pub user: String,
    pub key: String,
    pub trigger: String,
    pub priority: i32,
    pub entered_at: Micros,
    pub at: Micros,
}

/// A journey of the user that is not decided in this batch and was on its
/// way (entered, not exited) when a candidate came due: a more important one
/// due to go within the window wins over the candidate, as it would have in a
/// live engine that decided the candidate then.
#[derive(Debug, Clone)]
pub struct Upcoming {
    pub user: String,
    pub trigger: String,
    pub priority: i32,
    pub entered_at: Micros,
    pub due_at: Micros,
    pub exited_at: Option<Micros>,
    pub send_at: Micros,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Send { at: Micros },
    Defer { at: Micros, reason: String },
    Suppress(crate::decision::Stop),
}

/// Decides priority and caps for a batch, as a live engine deciding each
/// message when it comes due would, whatever the batch's size: a user's
/// messages are taken in due order, those due at one instant together.
/// First arbitration: a message loses to any more important message of the
/// same user going within the window: those due with it, those already going
/// (the outbox, `sent`, and earlier messages of the batch that were let
/// through), and those on their way when it came due (later ones of the
/// batch, and `upcoming`, that had entered and not exited by then);
/// importance is priority, then the most recent anchor, then the trigger
/// name. Then caps: global caps count all of the user's messages, a
/// trigger's own caps only its own. Transactional messages bypass both and
/// count for neither (the caller leaves them out of `upcoming`).
pub fn decide(
    candidates: &[Candidate<'_>],
    sent: &[Sent],
    upcoming: &[Upcoming],
    settings: &Settings,
) -> Vec<Verdict> {
    let arbitrate = settings.arbitration_us > 0 || settings.same_instant_only;
    let rank = |priority: i32, entered_at: Micros, trigger: &str| {
        if settings.same_instant_only {
            (priority, 0, String::new())
        } else {
            (priority, entered_at, trigger.to_owned())
        }
    };
    let mut verdicts: Vec<Verdict> = candidates
        .iter()
        .map(|c| Verdict::Send { at: c.send_at })
        .collect();
    // every rule is per user, in due order
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| {
        let c = &candidates[i];
        (
            c.user,
            c.due_at,
            std::cmp::Reverse(c.priority),
            c.trigger,
            c.key,
        )
    });
    let mut taken: HashMap<&str, Vec<Sent>> = HashMap::new();
    for s in sent {
        taken.entry(s.user.as_str()).or_default().push(s.clone());
    }
    // what is on its way: the batch's own messages, and the others
    let mut ahead: HashMap<&str, Vec<Upcoming>> = HashMap::new();
    for u in upcoming {
        ahead.entry(u.user.as_str()).or_default().push(u.clone());
    }
    for c in candidates.iter().filter(|c| !c.transactional) {
        ahead.entry(c.user).or_default().push(Upcoming {
            user: c.user.to_owned(),
            trigger: c.trigger.to_owned(),
            priority: c.priority,
            entered_at: c.entered_at,
            due_at: c.due_at,
            exited_at: None,
            send_at: c.send_at,
        });
    }
    let mut start = 0;
    while start < order.len() {
        // the messages of one user due at one instant
        let first = &candidates[order[start]];
        let end = start
            + order[start..]
                .iter()
                .take_while(|&&j| {
                    candidates[j].user == first.user && candidates[j].due_at == first.due_at
                })
                .count();
        let group = &order[start..end];
        start = end;
        let on_the_way = ahead.get(first.user).map_or(&[][..], Vec::as_slice);
        let mine = taken.entry(first.user).or_default();
        if arbitrate {
            for &i in group {
                let c = &candidates[i];
                if c.transactional {
                    continue;
                }
                let me = rank(c.priority, c.entered_at, c.trigger);
                let near = |at: Micros| (at - c.send_at).abs() <= settings.arbitration_us;
                let rival = group
                    .iter()
                    .map(|&j| (j, &candidates[j]))
                    .filter(|(j, o)| *j != i && !o.transactional && near(o.send_at))
                    .map(|(_, o)| {
                        (
                            rank(o.priority, o.entered_at, o.trigger),
                            o.trigger,
                            o.priority,
                            o.send_at,
                        )
                    })
                    .chain(mine.iter().filter(|s| near(s.at)).map(|s| {
                        (
                            rank(s.priority, s.entered_at, &s.trigger),
                            s.trigger.as_str(),
                            s.priority,
                            s.at,
                        )
                    }))
                    .chain(
                        on_the_way
                            .iter()
                            .filter(|u| {
                                u.due_at > c.due_at
                                    && u.entered_at <= c.due_at
                                    && u.exited_at.is_none_or(|x| x > c.due_at)
                                    && near(u.send_at)
                            })
                            .map(|u| {
                                (
                                    rank(u.priority, u.entered_at, &u.trigger),
                                    u.trigger.as_str(),
                                    u.priority,
                                    u.send_at,
                                )
                            }),
                    )
                    .filter(|r| r.0 > me)
                    .max_by(|a, b| a.0.cmp(&b.0));
                if let Some((_, trigger, priority, at)) = rival {
                    let within = if settings.same_instant_only {
                        "due at the same instant"
                    } else {
                        "within the arbitration window"
                    };
                    let why = format!(
                        "priority: lost to trigger {trigger} (priority {priority}) {within}"
                    );
                    verdicts[i] = if c.defer_on_conflict {
                        Verdict::Defer {
                            at: at + settings.arbitration_us,
                            reason: why,
                        }
                    } else {
                        Verdict::Suppress(Stop::new(Rule::Priority, why))
                    };
                }
            }
        }
        // caps, each message checked against every window it would share
        for &i in group {
            let c = &candidates[i];
            let at = match &verdicts[i] {
                Verdict::Send { at } | Verdict::Defer { at, .. } => *at,
                Verdict::Suppress(_) => continue,
            };
            if c.transactional {
                continue;
            }
            let all: Vec<Micros> = mine.iter().map(|s| s.at).collect();
            let own: Vec<Micros> = mine
                .iter()
                .filter(|s| s.trigger == c.trigger)
                .map(|s| s.at)
                .collect();
            let held = settings
                .caps
                .iter()
                .find(|cap| !cap.allows(at, &all))
                .or_else(|| c.caps.iter().find(|cap| !cap.allows(at, &own)));
            match held {
                Some(cap) => {
                    verdicts[i] =
                        Verdict::Suppress(Stop::new(Rule::Cap, format!("cap: {}", cap.label)))
                }
                None => mine.push(Sent { at, ..sent_of(c) }),
            }
        }
    }
    verdicts
}

fn sent_of(c: &Candidate<'_>) -> Sent {
    Sent {
        user: c.user.to_owned(),
        key: c.key.to_owned(),
        trigger: c.trigger.to_owned(),
        priority: c.priority,
        entered_at: c.entered_at,
        at: c.send_at,
    }
}

#[cfg(test)]
mod decide_tests {
    use super::*;
    use serde_json::json;

    const H: Micros = 3_600_000_000;

    fn cand<'a>(
        user: &'a str,
        trigger: &'a str,
        priority: i32,
        entered_at: Micros,
        caps: &'a [Cap],
    ) -> Candidate<'a> {
        Candidate {
            user,
            key: "",
            trigger,
            priority,
            entered_at,
            due_at: 10 * H,
            send_at: 10 * H,
            transactional: false,
            defer_on_conflict: false,
            caps,
        }
    }

    fn settings(v: serde_json::Value) -> Settings {
        Settings::parse(&v).unwrap().1
    }

    #[test]
    fn the_higher_priority_wins_and_the_other_names_it() {
        let s = settings(json!({"arbitration_window": "10 minutes"}));
        let v = decide(
            &[cand("u", "browse", 1, 0, &[]), cand("u", "cart", 5, 0, &[])],
            &[],
            &[],
            &s,
        );
        assert_eq!(v[1], Verdict::Send { at: 10 * H });
        assert!(
            matches!(&v[0], Verdict::Suppress(r) if r.why.starts_with("priority: lost to trigger cart (priority 5"))
        );
        // other users do not compete
        let v = decide(
            &[cand("u", "browse", 1, 0, &[]), cand("w", "cart", 5, 0, &[])],
            &[],
            &[],
            &s,
        );
        assert!(v.iter().all(|v| matches!(v, Verdict::Send { .. })));
    }

    #[test]
    fn among_equals_the_most_recent_anchor_wins_and_defer_moves_the_loser() {
        let s = settings(json!({"arbitration_window": "10 minutes"}));
        let mut old = cand("u", "a", 1, 0, &[]);
        old.defer_on_conflict = true;
        let v = decide(&[old, cand("u", "b", 1, H, &[])], &[], &[], &s);
        assert_eq!(v[1], Verdict::Send { at: 10 * H });
        assert!(matches!(&v[0], Verdict::Defer { at, .. } if *at == 10 * H + H / 6));
    }

    #[test]
    fn without_a_window_only_a_higher_priority_due_at_the_same_instant_wins() {
        let s = settings(json!({}));
        let v = decide(
            &[cand("u", "a", 1, 0, &[]), cand("u", "b", 5, 0, &[])],
            &[],
            &[],
            &s,
        );
        assert!(
            matches!(&v[0], Verdict::Suppress(why) if why.why.contains("lost to trigger b") && why.why.contains("same instant")),
            "{v:?}"
        );
        assert_eq!(v[1], Verdict::Send { at: 10 * H });
        // equal priorities both go; a minute apart, both go
        let v = decide(
            &[cand("u", "a", 5, 0, &[]), cand("u", "b", 5, 0, &[])],
            &[],
            &[],
            &s,
        );
        assert!(v.iter().all(|v| matches!(v, Verdict::Send { .. })), "{v:?}");
        let later = Candidate {
            send_at: 10 * H + 60_000_000,
            ..cand("u", "a", 1, 0, &[])
        };
        let v = decide(&[later, cand("u", "b", 5, 0, &[])], &[], &[], &s);
        assert!(v.iter().all(|v| matches!(v, Verdict::Send { .. })), "{v:?}");
    }

    #[test]
    fn caps_global_and_per_trigger_hold_back_with_the_rule() {
        let s = settings(json!({"caps": [{"max": 1, "per": "16 hours"}]}));
        let earlier = [Sent {
            user: "u".into(),
            key: String::new(),
            trigger: "x".into(),
            priority: 0,
            entered_at: 0,
            at: 0,
        }];
        // 10 hours after a message: held by the global cap
        let v = decide(&[cand("u", "a", 1, 0, &[])], &earlier, &[], &s);
        assert_eq!(
            v[0],
            Verdict::Suppress(Stop::new(Rule::Cap, "cap: 1 per 16 hours (global)"))
        );
        // 20 hours after: let through
        let mut later = cand("u", "a", 1, 0, &[]);
        later.send_at = 20 * H;
        later.due_at = 20 * H;
        assert_eq!(
            decide(&[later], &earlier, &[], &s)[0],
            Verdict::Send { at: 20 * H }
        );
        // two in one batch: the first goes, the second is held
        let v = decide(
            &[cand("u", "a", 1, 0, &[]), cand("u", "b", 1, 0, &[])],
            &[],
            &[],
            &s,
        );
        assert_eq!(
            v.iter()
                .filter(|v| matches!(v, Verdict::Send { .. }))
                .count(),
            1
        );
        // a trigger's own cap counts only its own messages
        let own = [Cap::compile(
            &CapSpec {
                max: 1,
                per: "1 day".into(),
            },
            "cap[0]",
            "this trigger",
        )
        .unwrap()];
        let v = decide(
            &[cand("u", "a", 1, 0, &own)],
            &earlier,
            &[],
            &Settings::default(),
        );
        assert_eq!(
            v[0],
            Verdict::Send { at: 10 * H },
            "the earlier message was another trigger's"
        );
        let mine = [Sent {
            trigger: "a".into(),
            ..earlier[0].clone()
        }];
        let v = decide(
            &[cand("u", "a", 1, 0, &own)],
            &mine,
            &[],
            &Settings::default(),
        );
        assert_eq!(
            v[0],
            Verdict::Suppress(Stop::new(Rule::Cap, "cap: 1 per 1 day (this trigger)"))
        );
    }

    #[test]
    fn a_message_due_later_does_not_take_back_one_decided_before_it() {
        // the browse reminder is due first and goes at 08:00; the cart
        // reminder, more important, comes due later for the same 08:00: a
        // live engine had already let the first through, and so does a batch
        let s = settings(json!({}));
        let mut browse = cand("u", "browse", 1, 0, &[]);
        let mut cart = cand("u", "cart", 5, 2 * H, &[]);
        (browse.due_at, cart.due_at) = (H, 5 * H);
        let v = decide(&[cart.clone(), browse.clone()], &[], &[], &s);
        assert!(v.iter().all(|v| matches!(v, Verdict::Send { .. })), "{v:?}");
        // the cart journey had entered when the browse reminder came due: it
        // was on its way, and wins
        cart.entered_at = H / 2;
        let v = decide(&[cart.clone(), browse.clone()], &[], &[], &s);
        assert!(
            matches!(&v[1], Verdict::Suppress(r) if r.rule == Rule::Priority),
            "{v:?}"
        );
        // the same when another pass decides it (the cart is upcoming)
        let up = Upcoming {
            user: "u".into(),
            trigger: "cart".into(),
            priority: 5,
            entered_at: H / 2,
            due_at: 5 * H,
            exited_at: None,
            send_at: 10 * H,
        };
        let v = decide(&[browse.clone()], &[], &[up.clone()], &s);
        assert!(
            matches!(&v[0], Verdict::Suppress(r) if r.rule == Rule::Priority),
            "{v:?}"
        );
        // but not once it had exited
        let gone = Upcoming {
            exited_at: Some(H / 2 + 1),
            ..up
        };
        let v = decide(&[browse], &[], &[gone], &s);
        assert_eq!(v[0], Verdict::Send { at: 10 * H });
    }

    /// One batch decides what a live engine deciding each instant's messages
    /// as they come due decides, whatever the mix of rules.
    #[test]
    fn one_batch_decides_as_passes_at_every_instant_do() {
        let mut seed: u64 = 7;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let cap = [Cap::compile(
            &CapSpec {
                max: 1,
                per: "3 hours".into(),
            },
            "cap",
            "this trigger",
        )
        .unwrap()];
        for window in [json!({}), json!({"arbitration_window": "30 minutes"})] {
            let mut spec = window.clone();
            spec["caps"] = json!([{"max": 2, "per": "1 day"}]);
            let s = settings(spec);
            let triggers = ["a", "b", "c"];
            let users = ["u", "v"];
            let mut cands = vec![];
            for i in 0..60 {
                let due = (next(48) as Micros) * H / 2;
                let t = next(3) as usize;
                let entered = due - (next(6) as Micros) * H / 2;
                let mut c = cand(
                    users[next(2) as usize],
                    triggers[t],
                    t as i32,
                    entered,
                    if t == 2 { &cap } else { &[] },
                );
                c.due_at = due;
                // quiet hours: some go at the next 8 o'clock
                c.send_at = if next(3) == 0 {
                    (due / (24 * H) + 1) * 24 * H + 8 * H
                } else {
                    due
                };
                c.transactional = next(10) == 0;
                c.defer_on_conflict = next(4) == 0;
                c.key = ["k0", "k1", "k2", "k3"][i % 4];
                cands.push(c);
            }
            let once = decide(&cands, &[], &[], &s);
            // instant by instant, each pass seeing what the earlier ones let through
            let mut sent: Vec<Sent> = vec![];
            let mut stepwise = vec![None; cands.len()];
            let mut instants: Vec<Micros> = cands.iter().map(|c| c.due_at).collect();
            instants.sort();
            instants.dedup();
            for at in instants {
                let idx: Vec<usize> = (0..cands.len())
                    .filter(|&i| cands[i].due_at == at)
                    .collect();
                let batch: Vec<Candidate<'_>> = idx.iter().map(|&i| cands[i].clone()).collect();
                // the journeys not yet due are in the database, waiting
                let upcoming: Vec<Upcoming> = cands
                    .iter()
                    .filter(|c| c.due_at > at && !c.transactional)
                    .map(|c| Upcoming {
                        user: c.user.into(),
                        trigger: c.trigger.into(),
                        priority: c.priority,
                        entered_at: c.entered_at,
                        due_at: c.due_at,
                        exited_at: None,
                        send_at: c.send_at,
                    })
                    .collect();
                for (k, v) in decide(&batch, &sent, &upcoming, &s).into_iter().enumerate() {
                    let c = &cands[idx[k]];
                    if let Verdict::Send { at } | Verdict::Defer { at, .. } = v {
                        if !c.transactional {
                            sent.push(Sent { at, ..sent_of(c) });
                        }
                    }
                    stepwise[idx[k]] = Some(v);
                }
            }
            let stepwise: Vec<Verdict> = stepwise.into_iter().map(Option::unwrap).collect();
            assert_eq!(once, stepwise, "{window}");
            assert!(once
                .iter()
                .any(|v| matches!(v, Verdict::Suppress(s) if s.rule == Rule::Cap)));
            assert!(once
                .iter()
                .any(|v| matches!(v, Verdict::Suppress(s) if s.rule == Rule::Priority)));
        }
    }

    #[test]
    fn a_batch_that_spans_days_is_capped_in_due_order() {
        let s = settings(json!({"caps": [{"max": 1, "per": "16 hours"}]}));
        // given latest first: 0 h goes, 6 h is held, 17 h goes
        let batch: Vec<Candidate> = [17, 6, 0]
            .iter()
            .map(|h| {
                let mut c = cand("u", "a", 1, h * H, &[]);
                c.send_at = h * H;
                c.due_at = h * H;
                c
            })
            .collect();
        let v = decide(&batch, &[], &[], &s);
        assert_eq!(v[0], Verdict::Send { at: 17 * H });
        assert!(matches!(v[1], Verdict::Suppress(_)));
        assert_eq!(v[2], Verdict::Send { at: 0 });
    }

    #[test]
    fn a_cap_counts_messages_that_go_out_later_too() {
        // 2 per day. A message decided earlier goes at 13:00 (quiet hours);
        // one due at 12:00 would make three in the day that ends at 13:00.
        let s = settings(json!({"caps": [{"max": 2, "per": "1 day"}]}));
        let at = |h: i64| Sent {
            user: "u".into(),
            key: String::new(),
            trigger: "a".into(),
            priority: 0,
            entered_at: 0,
            at: h * H,
        };
        let mut c = cand("u", "b", 0, 0, &[]);
        c.send_at = 12 * H;
        c.due_at = 12 * H;
        let v = decide(std::slice::from_ref(&c), &[at(-9), at(13)], &[], &s);
        assert_eq!(
            v[0],
            Verdict::Suppress(Stop::new(Rule::Cap, "cap: 2 per 1 day (global)"))
        );
        // without the later one, it fits
        assert_eq!(
            decide(&[c], &[at(-9)], &[], &s)[0],
            Verdict::Send { at: 12 * H }
        );
    }

    #[test]
    fn transactional_messages_bypass_caps() {
        let s =
            settings(json!({"caps": [{"max": 1, "per": "1 day"}], "arbitration_window": "1 hour"}));
        let sent = [Sent {
            user: "u".into(),
            key: String::new(),
            trigger: "x".into(),
            priority: 9,
            entered_at: 0,
            at: 9 * H,
        }];
        let mut receipt = cand("u", "receipt", 0, 0, &[]);
        receipt.transactional = true;
        let v = decide(&[receipt, cand("u", "promo", 0, 0, &[])], &sent, &[], &s);
        assert_eq!(v[0], Verdict::Send { at: 10 * H });
        assert!(matches!(&v[1], Verdict::Suppress(_)));
    }

    #[test]
    fn settings_errors_name_their_path() {
        let e = Settings::parse(&json!({"caps": [{"max": 1, "per": "16 hourz"}]})).unwrap_err();
        assert!(e.starts_with("caps[0].per: '16 hourz'"), "{e}");
        let e = Settings::parse(&json!({"default_timezone": "Mars/Base"})).unwrap_err();
        assert!(e.starts_with("default_timezone: unknown time zone"), "{e}");
        let e = Settings::parse(&json!({"cap": []})).unwrap_err();
        assert!(e.starts_with("cap: unknown field"), "{e}");
    }
}
