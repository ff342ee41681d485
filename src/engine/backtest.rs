//! nudge.backtest: what a definition would have done over a period of
//! history, without writing anything. Events stream from `nudge.all_events`
//! ordered by user, one user's history in memory at a time; each user's
//! journeys come from the same rules as live capture (`nudge_core::backtest`),
//! and the due ones go through the same send-time policies as run_due.

use crate::engine::run_due::{consent_of, profile_fact, profiles_of, settings, suppressions};
use crate::privilege::as_definer;
use crate::spi_util::{distinct, micros, or_raise, ts};
use nudge_core::backtest::{replay_user, Event};
use nudge_core::decision::{self, Facts, Rule};
use nudge_core::definition::{Definition, Trigger};
use nudge_core::experiment::HOLDOUT;
use nudge_core::policy::{self, Candidate, Upcoming, Verdict};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap};

const SAMPLES: usize = 5;

#[derive(Default)]
struct Tally(BTreeMap<String, (i64, Vec<String>)>);

impl Tally {
    fn add(&mut self, outcome: &str, user: &str, n: i64) {
        let e = self.0.entry(outcome.to_string()).or_default();
        e.0 += n;
        if e.1.len() < SAMPLES && !e.1.iter().any(|u| u == user) {
            e.1.push(user.to_string());
        }
    }
}

/// A journey that came due inside the period.
struct Due {
    user: String,
    key: String,
    entered_at: i64,
    due_at: i64,
}

pub fn backtest(
    definition: &Value,
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
    trigger_name: Option<&str>,
) -> Vec<(String, i64, Vec<String>)> {
    let d = Definition::parse(definition)
        .unwrap_or_else(|e| crate::spi_util::invalid(format!("backtest: {e}")));
    let name = trigger_name.unwrap_or("backtest");
    if trigger_name.is_none()
        && d.experiment.is_none()
        && (!d.variants.is_empty() || d.holdout.is_some())
    {
        notice!(
            "backtest: arms are drawn for experiment \"backtest\"; pass trigger_name (or set \"experiment\") to draw them as the live trigger does"
        );
    }
    let t: Trigger = d
        .compile(name, 0)
        .unwrap_or_else(|e| crate::spi_util::invalid(format!("backtest: {e}")));
    let (from_us, to_us) = (micros(from), micros(to));
    let lookback = t.entry_count.map_or(0, |(_, within)| within);
    let names: Vec<String> = t.watched_events().map(str::to_owned).collect();
    let mut run = Run {
        t: &t,
        from: from_us,
        to: to_us,
        tally: Tally::default(),
        due: vec![],
        others: vec![],
        pending: vec![],
    };

    Spi::connect(|c| {
        // one cursor per owner of sources, each opened and read as that
        // owner (see spi_util::run_per_owner), merged in (user, time) order;
        // COLLATE "C" so that the cursors sort as Rust compares
        let args = [names.into(), ts(from_us - lookback).into(), to.into()];
        let mut streams: Vec<Stream<'_>> = crate::all_events::groups(&c)
            .iter()
            .map(|g| {
                let text = "SELECT user_id, event, occurred_at, props FROM nudge.all_events e
                              WHERE event = ANY ($1) AND occurred_at >= $2 AND occurred_at < $3
                              ORDER BY user_id COLLATE \"C\", occurred_at"
                    .replace(crate::all_events::TOKEN, &g.union);
                let cursor = as_definer(g.owner, || c.open_cursor(&text, &args));
                Stream {
                    owner: g.owner,
                    cursor,
                    rows: VecDeque::new(),
                    done: false,
                }
            })
            .collect();
        let mut user = String::new();
        let mut events: Vec<Event> = vec![];
        loop {
            for s in streams.iter_mut() {
                s.refill();
            }
            let next = streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.rows.front().map(|r| (i, (&r.0, r.2))))
                .min_by(|a, b| a.1.cmp(&b.1))
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let (u, event, at, props) = streams[i].rows.pop_front().expect("a head");
            if u != user && !events.is_empty() {
                run.user_done(c, std::mem::take(&mut user), std::mem::take(&mut events));
            }
            user = u;
            events.push((event, at, props));
        }
        if !events.is_empty() {
            run.user_done(c, user, events);
        }
        run.flush(c);
        run.decide_due(c);
    });
    run.tally
        .0
        .into_iter()
        .map(|(k, (n, users))| (k, n, users))
        .collect()
}

/// A journey stopped (or an entry turned away) by a rule counts under its
/// state and rule: `suppressed: cap`, `not entered: reentry`.
fn label(rule: Rule) -> String {
    format!("{}: {}", rule.state(), rule)
}

/// One owner's sources, read a page at a time.
struct Stream<'c> {
    owner: pgrx::pg_sys::Oid,
    cursor: pgrx::spi::SpiCursor<'c>,
    rows: VecDeque<(String, String, i64, Value)>,
    done: bool,
}

impl Stream<'_> {
    fn refill(&mut self) {
        if !self.rows.is_empty() || self.done {
            return;
        }
        let cursor = &mut self.cursor;
        let page = as_definer(self.owner, || {
            or_raise(cursor.fetch(10_000), "backtest: reading events")
                .filter_map(|r| {
                    let at: TimestampWithTimeZone = r.get(3).ok().flatten()?;
                    Some((
                        r.get::<String>(1).ok().flatten().unwrap_or_default(),
                        r.get::<String>(2).ok().flatten().unwrap_or_default(),
                        micros(at),
                        r.get::<JsonB>(4)
                            .ok()
                            .flatten()
                            .map_or(Value::Null, |j| j.0),
                    ))
                })
                .collect::<Vec<_>>()
        });
        self.done = page.is_empty();
        self.rows.extend(page);
    }
}

/// Users are replayed in groups, so that the audience's profiles are read
/// with one query per group.
const GROUP: usize = 1000;

struct Run<'a> {
    t: &'a Trigger,
    from: i64,
    to: i64,
    tally: Tally,
    due: Vec<Due>,
    /// The journeys that did not come due in the period (exited, or due
    /// after it): priority weighs them as a live engine would have.
    others: Vec<(Due, Option<i64>)>,
    pending: Vec<(String, Vec<Event>)>,
}

impl Run<'_> {
    fn user_done(&mut self, c: &pgrx::spi::SpiClient<'_>, user: String, events: Vec<Event>) {
        self.pending.push((user, events));
        if self.pending.len() >= GROUP {
            self.flush(c);
        }
    }

    fn flush(&mut self, c: &pgrx::spi::SpiClient<'_>) {
        let pending = std::mem::take(&mut self.pending);
        let profiles = match &self.t.audience {
            Some(_) if !pending.is_empty() => {
                profiles_of(c, pending.iter().map(|(u, _)| u.clone()).collect())
            }
            _ => HashMap::new(),
        };
        for (user, events) in pending {
            // audience is checked at entry, on the profile: as it is now
            if let (Some(a), Some(Ok(p))) = (&self.t.audience, profiles.get(&user)) {
                if !a.matches(p) {
                    let entries = events
                        .iter()
                        .filter(|(n, at, props)| *at >= self.from && self.t.enters(n, props))
                        .count() as i64;
                    if entries > 0 {
                        self.tally.add("not entered: audience", &user, entries);
                    }
                    continue;
                }
            }
            self.replay(&user, &events);
        }
    }

    fn replay(&mut self, user: &str, events: &[Event]) {
        let r = replay_user(self.t, events, self.from, self.to);
        for b in &r.blocked {
            self.tally.add(&label(b.rule), user, 1);
        }
        for j in r.journeys {
            self.tally.add("entered", user, 1);
            if !j.coalesced.is_empty() {
                self.tally
                    .add("coalesced entries", user, j.coalesced.len() as i64);
            }
            let d = Due {
                user: user.to_string(),
                key: j.key,
                entered_at: j.entered_at,
                due_at: j.due_at,
            };
            if let Some((at, _)) = j.exited {
                self.tally.add("exited", user, 1);
                self.others.push((d, Some(at)));
            } else if j.due_at >= self.to {
                self.tally.add("waiting at the end", user, 1);
                self.others.push((d, None));
            } else {
                self.due.push(d);
            }
        }
    }

    /// The send-time rules for the journeys due in the period: audience again,
    /// the suppression list, the send schedule, the holdout, caps and priority
    /// among the definition's own messages.
    fn decide_due(&mut self, c: &pgrx::spi::SpiClient<'_>) {
        let t = self.t;
        let users = distinct(self.due.iter().map(|d| d.user.clone()));
        if users.is_empty() {
            return;
        }
        let profiles = profiles_of(c, users.clone());
        let suppressed = suppressions(c, users.clone(), &profiles);
        let consent = consent_of(c, users);
        let settings = settings(c);
        let mut candidates = vec![];
        let mut moved = vec![];
        let mut ahead: Vec<(&Due, Option<i64>)> = vec![];
        for d in &self.due {
            // run_due's checks, as a live pass at the due time would run them
            // (audience_sql and context are the live trigger's and not run here)
            let facts = Facts {
                due_at: d.due_at,
                now: d.due_at,
                exit: None,
                retry: None,
                profile: profile_fact(profiles.get(&d.user)),
                audience_sql: None,
                suppressions: &suppressed,
                consent: &consent,
            };
            let profile = match decision::screen(t, &d.user, &facts) {
                Ok((profile, _)) => profile,
                Err(stop) => {
                    self.tally.add(&label(stop.rule), &d.user, 1);
                    ahead.push((d, None));
                    continue;
                }
            };
            let send_at = t.schedule.send_time(
                d.due_at,
                Some(profile),
                settings.default_timezone.as_deref(),
            );
            moved.push(send_at > d.due_at);
            candidates.push(Candidate {
                user: &d.user,
                key: &d.key,
                trigger: "backtest",
                priority: t.priority,
                entered_at: d.entered_at,
                due_at: d.due_at,
                send_at,
                transactional: t.transactional,
                defer_on_conflict: t.defer_on_conflict,
                caps: &t.caps,
            });
        }
        ahead.extend(self.others.iter().map(|(d, exit)| (d, *exit)));
        let upcoming: Vec<Upcoming> = ahead
            .into_iter()
            .filter(|_| !t.transactional)
            .map(|(d, exited_at)| Upcoming {
                user: d.user.clone(),
                trigger: "backtest".into(),
                priority: t.priority,
                entered_at: d.entered_at,
                due_at: d.due_at,
                exited_at,
                send_at: t.schedule.send_time(
                    d.due_at,
                    profiles.get(&d.user).and_then(|p| p.as_ref().ok()),
                    settings.default_timezone.as_deref(),
                ),
            })
            .collect();
        let verdicts = policy::decide(&candidates, &[], &upcoming, &settings);
        for ((c, v), later) in candidates.iter().zip(verdicts).zip(moved) {
            match v {
                Verdict::Suppress(stop) => self.tally.add(&label(stop.rule), c.user, 1),
                _ if t.arm_of(c.user).as_deref() == Some(HOLDOUT) => {
                    self.tally.add("held out", c.user, 1)
                }
                _ => {
                    self.tally.add("sent", c.user, 1);
                    if later {
                        self.tally.add("sent later (send schedule)", c.user, 1);
                    }
                }
            }
        }
    }
}
