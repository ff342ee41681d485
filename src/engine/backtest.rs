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
use nudge_core::flow::{self, Next, StepEnd};
use nudge_core::policy::{self, Candidate, Upcoming, Verdict};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap};

pub const SAMPLES: usize = 5;

/// Per step and outcome: how many, and a few users.
#[derive(Default)]
struct Tally(BTreeMap<(String, String), (i64, Vec<String>)>);

impl Tally {
    fn add(&mut self, step: &str, outcome: &str, user: &str, n: i64) {
        let e = self
            .0
            .entry((step.to_string(), outcome.to_string()))
            .or_default();
        e.0 += n;
        if e.1.len() < SAMPLES && !e.1.iter().any(|u| u == user) {
            e.1.push(user.to_string());
        }
    }
}

/// A journey of the period, walked step by step once the profiles are read.
struct Walk {
    user: String,
    key: String,
    entered_at: i64,
    anchor: Value,
    /// Per step: the times of the exits (the journey's or the step's) from
    /// the anchor on, in order.
    exits: Vec<Vec<i64>>,
}

pub fn backtest(
    definition: &Value,
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
    trigger_name: Option<&str>,
) -> Vec<(String, i64, Vec<String>, String)> {
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
    if t.watches_profile() {
        crate::spi_util::invalid(
            "backtest: a segment entry or a date on the profile cannot be replayed (there is no history of profiles)",
        );
    }
    let (from_us, to_us) = (micros(from), micros(to));
    let lookback = t.entry_count.map_or(0, |(_, within)| within);
    let names: Vec<String> = t.watched_events().map(str::to_owned).collect();
    let mut run = Run {
        t: &t,
        from: from_us,
        to: to_us,
        tally: Tally::default(),
        walks: vec![],
        pending: vec![],
        stored_as: trigger_name.unwrap_or(name).to_owned(),
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
                // a cursor is no kept statement (spi_util::run): on a Citus
                // node, the group's shards are named here
                let text = match crate::citus::current() {
                    Some(group) => group.rewrite(&text),
                    None => text,
                };
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
    // in the order of the steps, then of the outcomes
    let order: HashMap<&str, usize> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut rows: Vec<_> = run.tally.0.into_iter().collect();
    rows.sort_by_key(|((step, outcome), _)| (order.get(step.as_str()).copied(), outcome.clone()));
    rows.into_iter()
        .map(|((step, outcome), (n, users))| (outcome, n, users, step))
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
    walks: Vec<Walk>,
    pending: Vec<(String, Vec<Event>)>,
    /// The live trigger's name: engagement with earlier steps is read from
    /// its journeys.
    stored_as: String,
}

impl Run<'_> {
    fn first(&self) -> &str {
        &self.t.steps[0].name
    }

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
                        let first = self.first().to_owned();
                        self.tally
                            .add(&first, "not entered: audience", &user, entries);
                    }
                    continue;
                }
            }
            self.replay(&user, &events);
        }
    }

    fn replay(&mut self, user: &str, events: &[Event]) {
        let t = self.t;
        let first = self.first().to_owned();
        let r = replay_user(t, events, self.from, self.to);
        for b in &r.blocked {
            self.tally.add(&first, &label(b.rule), user, 1);
        }
        for j in r.journeys {
            self.tally.add(&first, "entered", user, 1);
            if !j.coalesced.is_empty() {
                self.tally
                    .add(&first, "coalesced entries", user, j.coalesced.len() as i64);
            }
            // as run_due finds them at each step's send time: exits from the
            // anchor on, the anchor itself apart
            let exits = (0..t.steps.len())
                .map(|k| {
                    events
                        .iter()
                        .filter(|(_, at, _)| *at >= j.entered_at)
                        .filter(|(n, at, props)| !(*at == j.entered_at && t.enters(n, props)))
                        .filter(|(n, _, props)| match t.exit_scope_at(k, n, props) {
                            Some(None) => true,
                            Some(Some(key)) => key == j.key,
                            None => false,
                        })
                        .map(|(_, at, _)| *at)
                        .collect()
                })
                .collect();
            self.walks.push(Walk {
                user: user.to_string(),
                key: j.key,
                entered_at: j.entered_at,
                anchor: j
                    .anchor
                    .and_then(|i| events.get(i))
                    .map_or(Value::Null, |e| e.2.clone()),
                exits,
            });
        }
    }

    /// Walks each journey through its steps with run_due's rules, as live
    /// passes at each step's due time would: exits, the step's branch, the
    /// audience, suppression list and consent, the send schedule and the
    /// holdout; then caps and priority among the definition's own messages.
    fn decide_due(&mut self, c: &pgrx::spi::SpiClient<'_>) {
        let t = self.t;
        let users = distinct(self.walks.iter().map(|w| w.user.clone()));
        if users.is_empty() {
            return;
        }
        let profiles = profiles_of(c, users.clone());
        let suppressed = suppressions(c, users.clone(), &profiles);
        let consent = consent_of(c, users);
        let settings = settings(c);
        // engagement with earlier steps, for every step that branches
        let mut at = vec![];
        let zone = |user: &str| {
            let profile = profiles.get(user).and_then(|p| p.as_ref().ok());
            policy::profile_zone(profile, settings.default_timezone.as_deref())
        };
        for w in &self.walks {
            for k in 1..t.steps.len() {
                at.push(crate::engine::engagement::At {
                    trigger: t,
                    stored_as: &self.stored_as,
                    user: &w.user,
                    key: &w.key,
                    entered_at: w.entered_at,
                    step: k,
                    anchor: &w.anchor,
                    tz: zone(&w.user),
                });
            }
        }
        let engagement = crate::engine::engagement::engagement(c, &at);
        let per_walk = t.steps.len().saturating_sub(1);
        // (walk, step, due, send_at, sent later)
        let mut candidates: Vec<(usize, usize, i64, i64, bool)> = vec![];
        let mut ahead: Vec<Upcoming> = vec![];
        let upcoming = |w: &Walk, due_at: i64, exited_at: Option<i64>| Upcoming {
            user: w.user.clone(),
            trigger: "backtest".into(),
            priority: t.priority,
            entered_at: w.entered_at,
            due_at,
            exited_at,
            send_at: t.schedule.send_time(
                due_at,
                profiles.get(&w.user).and_then(|p| p.as_ref().ok()),
                settings.default_timezone.as_deref(),
            ),
        };
        for (wi, w) in self.walks.iter().enumerate() {
            let tz = zone(&w.user);
            // a yearly date's journey comes again: (from, due) of this year's
            let mut entered = w.entered_at;
            let Some(mut due) = t.first_due(entered, &w.anchor, tz) else {
                continue;
            };
            let mut k = 0;
            loop {
                let step = &t.steps[k].name;
                if k > 0 {
                    let Some(at) = t.step_due(k, w.entered_at, &w.anchor, tz) else {
                        break;
                    };
                    due = at;
                }
                let exit = w.exits[k].iter().find(|x| **x >= entered && **x < due);
                if let Some(&x) = exit {
                    self.tally.add(step, "exited", &w.user, 1);
                    ahead.push(upcoming(w, due, Some(x)));
                    break;
                }
                if due >= self.to {
                    self.tally.add(step, "waiting at the end", &w.user, 1);
                    ahead.push(upcoming(w, due, None));
                    break;
                }
                let doc = flow::branch_doc(
                    profiles
                        .get(&w.user)
                        .and_then(|p| p.as_ref().ok())
                        .unwrap_or(&Value::Null),
                    &w.anchor,
                    (k > 0)
                        .then(|| engagement.get(&(wi * per_walk + k - 1)))
                        .flatten()
                        .unwrap_or(&Default::default()),
                );
                let end = if let Some((to, _)) = flow::branch(&t.steps, k, &doc) {
                    self.tally.add(step, &label(Rule::Branch), &w.user, 1);
                    StepEnd::Branched(to)
                } else {
                    // run_due's checks, as a live pass at the due time would run them
                    // (audience_sql and context are the live trigger's and not run here)
                    let facts = Facts {
                        due_at: due,
                        now: due,
                        exit: None,
                        retry: None,
                        profile: profile_fact(profiles.get(&w.user)),
                        audience_sql: None,
                        suppressions: &suppressed,
                        consent: &consent,
                    };
                    match decision::screen(t, &w.user, &facts) {
                        Ok((profile, _)) => {
                            let send_at = t.schedule.send_time(
                                due,
                                Some(profile),
                                settings.default_timezone.as_deref(),
                            );
                            candidates.push((wi, k, due, send_at, send_at > due));
                            StepEnd::Sent
                        }
                        Err(stop) => {
                            self.tally.add(step, &label(stop.rule), &w.user, 1);
                            ahead.push(upcoming(w, due, None));
                            StepEnd::Stopped(stop.rule)
                        }
                    }
                };
                match flow::after(&t.steps, k, end) {
                    Next::Step(j) => k = j,
                    Next::End => match t.date.as_ref().filter(|d| d.every_year) {
                        Some(d) if end != StepEnd::Stopped(Rule::Exit) => {
                            let Some(next) = d.due(&w.anchor, tz, due) else {
                                break;
                            };
                            (entered, due) = (due, next);
                        }
                        _ => break,
                    },
                }
            }
        }
        if t.transactional {
            ahead.clear();
        }
        let walks = &self.walks;
        let list: Vec<Candidate<'_>> = candidates
            .iter()
            .map(|(wi, _, due, send_at, _)| Candidate {
                user: &walks[*wi].user,
                key: &walks[*wi].key,
                trigger: "backtest",
                priority: t.priority,
                entered_at: walks[*wi].entered_at,
                due_at: *due,
                send_at: *send_at,
                transactional: t.transactional,
                defer_on_conflict: t.defer_on_conflict,
                caps: &t.caps,
            })
            .collect();
        let verdicts = policy::decide(&list, &[], &ahead, &settings);
        for ((wi, k, _, _, later), v) in candidates.iter().zip(verdicts) {
            let (user, step) = (&walks[*wi].user, &t.steps[*k].name);
            match v {
                Verdict::Suppress(stop) => self.tally.add(step, &label(stop.rule), user, 1),
                _ if t.arm_of(user).as_deref() == Some(HOLDOUT) => {
                    self.tally.add(step, "held out", user, 1)
                }
                _ => {
                    self.tally.add(step, "sent", user, 1);
                    if *later {
                        self.tally.add(step, "sent later (send schedule)", user, 1);
                    }
                }
            }
        }
    }
}
