//! Capture: a statement's new events open, coalesce and exit enrollments, in
//! the inserting transaction. Called once per statement by the capture
//! trigger of each source with the statement's events as four arrays.

use crate::catalog::{live_triggers, LiveTrigger};
use crate::spi_util::{distinct, history, micros, run, ts, KeyFilter};
use nudge_core::decision::Rule;
use nudge_core::definition::{Reentry, AUDIENCE_SQL};
use nudge_core::sequence::{keep_repeated, sequence, Journey, Step};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::BTreeMap;
use std::collections::HashMap;

/// Advisory-lock classes of capture (arbitrary constants, so that our locks
/// do not collide with an application's): one key per user, and one key that
/// a statement with many users takes instead.
const USER_LOCK_CLASS: i32 = 0x6e75_6467; // "nudg"
const ALL_USERS_LOCK_CLASS: i32 = 0x6e75_6468;
/// Above this many users a statement locks all users at once: the lock table
/// holds only max_locks_per_transaction (64 by default) per connection.
const MAX_USER_LOCKS: usize = 32;
/// Users are locked by slot (a hash of the user id), so that however many
/// statements a transaction runs, with however many users (a backfill that
/// calls nudge.track once per row), it holds at most this many user locks:
/// one lock per user would fill the server's shared lock table. Two users of
/// one slot only wait for each other's capture.
pub(super) const USER_LOCK_SLOTS: i32 = 256;

#[derive(Default)]
pub struct Batch {
    pub users: Vec<Option<String>>,
    pub events: Vec<Option<String>>,
    pub times: Vec<Option<TimestampWithTimeZone>>,
    pub props: Vec<Option<JsonB>>,
}

pub fn capture(batch: Batch) {
    let mut batch = batch;
    Spi::connect_mut(|c| {
        let catalog = live_triggers(c);
        let triggers = &catalog.triggers;
        if triggers.is_empty() {
            return;
        }
        recheck_segments(c, triggers, &mut batch);
        let mut steps = steps_of(&batch, &triggers);
        if steps.is_empty() {
            return;
        }
        let mut writes = Writes::default();
        repeated_entries(c, &mut steps, triggers, &batch);
        audience_at_entry(c, &mut steps, &triggers, &mut writes);
        let zones = zones_of_date_entries(c, &steps, triggers);
        lock_users(c, steps.keys().map(|(_, u)| u.clone()).collect());

        let (pair_t, pair_u): (Vec<String>, Vec<String>) = steps
            .keys()
            .map(|(t, u)| (triggers[*t].trigger.name.clone(), u.clone()))
            .unzip();
        // A journey due before the batch's first event is beyond its reach
        // (no entry can join it, no exit close it): only run_due still wants it.
        let first = steps
            .values()
            .flatten()
            .map(Step::at)
            .min()
            .unwrap_or(i64::MAX); // every entry turned away: nothing to read
                                  // a journey of steps reaches past its current step's due time, to its
                                  // last step's (flow::span)
        let beyond = steps
            .keys()
            .map(|(ti, _)| {
                let t = &triggers[*ti].trigger;
                t.span_us() - t.wait_us
            })
            .max()
            .unwrap_or(0)
            .max(0);
        let rows = run(
            c,
            "SELECT e.id, e.trigger, e.user_id, e.key, e.entered_at, e.due_at, e.last_entry_at, e.exited_at
               FROM unnest($1::text[], $2::text[]) AS p(trigger, user_id)
               JOIN nudge.enrollments e ON e.user_id = p.user_id AND e.trigger = p.trigger
              WHERE e.state = 'waiting' AND e.due_at >= $3
              ORDER BY e.entered_at
                FOR UPDATE OF e",
            &[pair_t.into(), pair_u.into(), ts(first.saturating_sub(beyond)).into()],
            "reading waiting enrollments",
        );
        let by_name: HashMap<&str, &nudge_core::definition::Trigger> = triggers
            .iter()
            .map(|l| (l.trigger.name.as_str(), &l.trigger))
            .collect();
        let mut open: BTreeMap<(String, String), Vec<Journey>> = BTreeMap::new();
        let mut closed_before: HashMap<i64, i64> = HashMap::new();
        let mut current_due: HashMap<i64, i64> = HashMap::new();
        let mut last_entry: HashMap<i64, i64> = HashMap::new();
        for row in rows {
            if let (Ok(Some(id)), Ok(Some(last))) =
                (row.get::<i64>(1), row.get::<TimestampWithTimeZone>(7))
            {
                last_entry.insert(id, micros(last));
            }
            let get_s = |i| -> String { row.get::<String>(i).ok().flatten().unwrap_or_default() };
            let id: i64 = row.get(1).ok().flatten().unwrap_or_default();
            let entered: TimestampWithTimeZone =
                row.get(5).ok().flatten().expect("entered_at is NOT NULL");
            let due: TimestampWithTimeZone = row.get(6).ok().flatten().expect("due_at is NOT NULL");
            let span = by_name.get(get_s(2).as_str()).map_or(0, |t| t.span_us());
            let until = micros(due).max(micros(entered) + span);
            let mut j = Journey::open(id, get_s(4), micros(entered), until);
            // a journey of steps that an exit closed after its current step's
            // due time: that step still goes, the exit ends a later one
            if let Some(x) = row.get::<TimestampWithTimeZone>(8).ok().flatten() {
                j.exited = Some((micros(x), String::new()));
                closed_before.insert(id, micros(x));
            }
            current_due.insert(id, micros(due));
            open.entry((get_s(2), get_s(3))).or_default().push(j);
        }

        let moved =
            reopen_after_late_exits(c, &mut steps, &open, &last_entry, &triggers, &mut batch);
        let ended = ended_journeys(c, &steps, triggers, first, catalog.step_column);
        let winners = crate::experiments::winners(
            c,
            triggers
                .iter()
                .map(|l| &l.trigger)
                .filter(|t| t.optimize.is_some())
                .collect(),
        );
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let mut due_now = false;
        let none = HashMap::new();
        for ((ti, user), steps) in steps {
            let t = &triggers[ti].trigger;
            let pair = (t.name.clone(), user.clone());
            let existing = open.remove(&pair).unwrap_or_default();
            let done = sequence(
                existing,
                ended.get(&pair).unwrap_or(&none),
                steps,
                t.span_us(),
                t.reentry,
            );
            for mut j in done.journeys {
                if let Some(id) = j.id {
                    // closed by an earlier statement: nothing new to write of it
                    if closed_before.get(&id).copied() == j.exited.as_ref().map(|(x, _)| *x) {
                        j.exited = None;
                        if j.coalesced.is_empty() {
                            continue;
                        }
                    }
                }
                // an exit closes the step waiting at its time; one after that
                // step's due time leaves it to go, and ends a later step when
                // run_due finds the exit at that step's send time
                let step_due = match j.id {
                    Some(id) => Some(current_due.get(&id).copied().unwrap_or(j.due_at)),
                    None => {
                        let anchor = j
                            .anchor
                            .and_then(|i| batch.props.get(i))
                            .and_then(|p| p.as_ref());
                        let empty = Value::Object(Default::default());
                        t.first_due(
                            j.entered_at,
                            anchor.map_or(&empty, |p| &p.0),
                            zones
                                .get(&user)
                                .copied()
                                .unwrap_or(nudge_core::policy::Tz::UTC),
                        )
                    }
                };
                // a date with no due time in the recipient's zone (at the
                // edge of the calendar): no journey
                let Some(step_due) = step_due else { continue };
                let closes = j.exited.as_ref().is_some_and(|(x, _)| *x < step_due);
                due_now |= j.id.is_none() && !closes && step_due <= now;
                writes.add(
                    t,
                    &user,
                    j,
                    (step_due, closes),
                    &batch,
                    winners.get(&t.name).map(String::as_str),
                );
            }
            for b in done.blocked {
                writes.note(&user, &t.name, b.at, b.rule, b.reason);
            }
        }
        for (id, n) in &moved {
            writes.uncoalesce(*id, *n);
        }
        writes.flush(c);
        if due_now {
            crate::worker::wake_on_commit();
        }
    })
}

/// The batch's users who had an event that a segment trigger re-checks on:
/// their entries into segments join the batch (as entry events of their own).
fn recheck_segments(c: &pgrx::spi::SpiClient<'_>, triggers: &[LiveTrigger], batch: &mut Batch) {
    let segments: Vec<&nudge_core::definition::Trigger> =
        crate::engine::segments::triggers(triggers)
            .into_iter()
            .filter(|t| !t.recheck_on().is_empty())
            .collect();
    if segments.is_empty() {
        return;
    }
    let mut who: BTreeMap<String, i64> = BTreeMap::new();
    for ((u, e), t) in batch.users.iter().zip(&batch.events).zip(&batch.times) {
        let (Some(u), Some(e), Some(t)) = (u, e, t) else {
            continue;
        };
        let rechecks = segments.iter().any(|s| s.recheck_on().contains(e));
        if rechecks {
            let at = who.entry(u.clone()).or_insert(i64::MIN);
            *at = (*at).max(micros(*t));
        }
    }
    let who: Vec<(String, i64)> = who.into_iter().collect();
    // on the application's write path: a failure here (a profile query
    // that fails) is a warning, and the membership stays as it was
    let more = match crate::isolate::subtransaction(|| {
        crate::engine::segments::changes(c, &segments, &who)
    }) {
        Ok(more) => more,
        Err(e) => {
            warning!("pg_nudge: checking segments failed: {e}");
            return;
        }
    };
    batch.users.extend(more.users);
    batch.events.extend(more.events);
    batch.times.extend(more.times);
    batch.props.extend(more.props);
}

/// The time zones of the users entering a date entry's journey (their
/// profiles', else the default): its date is due at a local time.
fn zones_of_date_entries(
    c: &pgrx::spi::SpiClient<'_>,
    steps: &BTreeMap<(usize, String), Vec<Step>>,
    triggers: &[LiveTrigger],
) -> HashMap<String, nudge_core::policy::Tz> {
    let users = distinct(
        steps
            .iter()
            .filter(|((ti, _), st)| {
                triggers[*ti].trigger.date.is_some()
                    && st.iter().any(|s| matches!(s, Step::Entry { .. }))
            })
            .map(|((_, u), _)| u.clone()),
    );
    if users.is_empty() {
        return HashMap::new();
    }
    let default = crate::engine::run_due::settings(c).default_timezone;
    let profiles = crate::engine::run_due::profiles_of(c, users.clone());
    users
        .into_iter()
        .map(|u| {
            let p = profiles.get(&u).and_then(|p| p.as_ref().ok());
            let tz = nudge_core::policy::profile_zone(p, default.as_deref());
            (u, tz)
        })
        .collect()
}

/// Serializes capture per user, so that two concurrent statements with events
/// of one user see each other's enrollments. A statement with few users takes
/// the all-users key shared, then its users' keys in hash order; one with many
/// takes the all-users key exclusively. Same order everywhere: no deadlock.
fn lock_users(c: &mut pgrx::spi::SpiClient<'_>, users: std::collections::BTreeSet<String>) {
    if users.len() > MAX_USER_LOCKS {
        run(
            c,
            "SELECT pg_advisory_xact_lock($1, 0)",
            &[crate::citus::lock_class(ALL_USERS_LOCK_CLASS).into()],
            "locking all users",
        );
        return;
    }
    let users: Vec<String> = users.into_iter().collect();
    // one statement; the shared key first: the uncorrelated sub-select is a
    // one-time filter, evaluated before the first user's lock
    run(
        c,
        "SELECT count(pg_advisory_xact_lock($2, h))
           FROM (SELECT DISTINCT hashtext(u) & ($4 - 1) AS h FROM unnest($3::text[]) u ORDER BY 1) s
          WHERE (SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared($1, 0)) g) = 1",
        &[
            crate::citus::lock_class(ALL_USERS_LOCK_CLASS).into(),
            crate::citus::lock_class(USER_LOCK_CLASS).into(),
            users.into(),
            USER_LOCK_SLOTS.into(),
        ],
        "locking users",
    );
}

/// For triggers that enter on the n-th event within a window ("viewed 3
/// times in an hour"): keeps an entry step only when, counting the events of
/// every source up to and including it, the window holds enough matching
/// events of the same key. One query per such trigger for the whole batch.
fn repeated_entries(
    c: &pgrx::spi::SpiClient<'_>,
    steps: &mut BTreeMap<(usize, String), Vec<Step>>,
    triggers: &[LiveTrigger],
    batch: &Batch,
) {
    for (ti, lt) in triggers.iter().enumerate() {
        let t = &lt.trigger;
        let Some((min_count, within)) = t.entry_count else {
            continue;
        };
        let mut users = vec![];
        let mut entries = vec![];
        let (mut from, mut to) = (i64::MAX, i64::MIN);
        for ((i, u), st) in steps.iter() {
            for s in st.iter().filter(|_| *i == ti) {
                if let Step::Entry { at, event, .. } = s {
                    users.push(u.clone());
                    entries.push(*event);
                    from = from.min(at - within);
                    to = to.max(*at);
                }
            }
        }
        if users.is_empty() {
            continue;
        }
        users.dedup();
        // The statement's own rows are already in the source tables: an AFTER
        // trigger sees them, so the history includes the batch.
        let rows = history(
            c,
            users,
            vec![t.entry_event.clone()],
            from,
            to,
            KeyFilter::of(
                t,
                entries
                    .iter()
                    .filter_map(|i| batch.props.get(*i).and_then(|p| p.as_ref()).map(|p| &p.0)),
            ),
            "counting repeated entry events",
        );
        let mut seen_by_user: HashMap<String, Vec<(i64, String)>> = HashMap::new();
        for (user, event, at, props) in rows {
            if t.enters(&event, &props) {
                seen_by_user
                    .entry(user)
                    .or_default()
                    .push((at, t.key_of(&props)));
            }
        }
        for ((i, u), st) in steps.iter_mut() {
            if *i != ti {
                continue;
            }
            let seen = seen_by_user.get(u).map(Vec::as_slice).unwrap_or_default();
            keep_repeated(st, seen, min_count, within);
        }
    }
}

/// Drops the entry steps of users outside a trigger's audience (the profile
/// predicate, then audience_sql run as the trigger's owner). A user without a
/// profile, or whose lookup fails, is let in: the send-time check decides.
fn audience_at_entry(
    c: &pgrx::spi::SpiClient<'_>,
    steps: &mut BTreeMap<(usize, String), Vec<Step>>,
    triggers: &[LiveTrigger],
    writes: &mut Writes,
) {
    let entering = |want: &dyn Fn(&nudge_core::definition::Trigger) -> bool| -> Vec<String> {
        let users = steps
            .iter()
            .filter(|((ti, _), st)| {
                want(&triggers[*ti].trigger) && st.iter().any(|s| matches!(s, Step::Entry { .. }))
            })
            .map(|((_, u), _)| u.clone());
        distinct(users)
    };
    let users = entering(&|t| t.audience.is_some());
    let profiles = if users.is_empty() {
        HashMap::new()
    } else {
        crate::engine::run_due::profiles_of(c, users)
    };
    let asking: Vec<(&nudge_core::definition::Trigger, Vec<String>)> = triggers
        .iter()
        .filter(|l| l.trigger.has_audience_sql)
        .map(|l| (&l.trigger, entering(&|t| t.name == l.trigger.name)))
        .collect();
    let answers = crate::engine::run_due::answers_for(c, asking);
    for ((ti, user), st) in steps.iter_mut() {
        let t = &triggers[*ti].trigger;
        let why_not = match (&t.audience, profiles.get(user)) {
            (Some(audience), Some(Ok(profile))) => audience.why_not(profile),
            _ => None,
        };
        let refused = match why_not {
            Some(why) => Some((
                Rule::Audience,
                format!("audience: the profile does not match: {why}"),
            )),
            None => match answers
                .get(&(t.name.clone(), AUDIENCE_SQL.to_string()))
                .and_then(|a| a.get(user))
            {
                Some(Ok(Value::Bool(false) | Value::Null)) => Some((
                    Rule::AudienceSql,
                    "audience_sql: false for this user".to_string(),
                )),
                _ => None,
            },
        };
        let Some((rule, reason)) = refused else {
            continue;
        };
        st.retain(|s| match s {
            Step::Entry { at, .. } => {
                writes.note(user, &t.name, *at, rule, reason.clone());
                false
            }
            Step::Exit { .. } => true,
        });
    }
}

/// An exit in this batch may close a waiting journey at a time before some
/// entries that earlier statements coalesced into it (history of two tables
/// loaded one table at a time: all cart adds, then the purchases). In event
/// time those later entries open a journey of their own after the exit, so
/// they are read back from the sources and sequenced again with the batch.
/// Returns, per existing journey, how many coalesced entries moved out of it.
fn reopen_after_late_exits(
    c: &pgrx::spi::SpiClient<'_>,
    steps: &mut BTreeMap<(usize, String), Vec<Step>>,
    open: &BTreeMap<(String, String), Vec<Journey>>,
    last_entry: &HashMap<i64, i64>,
    triggers: &[LiveTrigger],
    batch: &mut Batch,
) -> HashMap<i64, i32> {
    // (trigger index, user, key, exit time, last coalesced entry, journey id)
    let mut wanted = vec![];
    for ((ti, user), st) in steps.iter() {
        let t = &triggers[*ti].trigger;
        for j in open
            .get(&(t.name.clone(), user.clone()))
            .into_iter()
            .flatten()
        {
            let exit = st
                .iter()
                .filter_map(|s| match s {
                    Step::Exit { at, key, .. }
                        if key.as_ref().is_none_or(|k| *k == j.key)
                            && j.entered_at <= *at
                            && *at < j.due_at =>
                    {
                        Some(*at)
                    }
                    _ => None,
                })
                .min();
            let (Some(x), Some(id)) = (exit, j.id) else {
                continue;
            };
            if last_entry.get(&id).is_some_and(|last| *last > x) {
                wanted.push((*ti, user.clone(), j.key.clone(), x, last_entry[&id], id));
            }
        }
    }
    let mut moved = HashMap::new();
    if wanted.is_empty() {
        return moved;
    }
    let users: Vec<String> = wanted.iter().map(|w| w.1.clone()).collect();
    let names: Vec<String> = wanted
        .iter()
        .map(|w| triggers[w.0].trigger.entry_event.clone())
        .collect();
    let from = wanted.iter().map(|w| w.3).min().expect("not empty");
    let to = wanted.iter().map(|w| w.4).max().expect("not empty");
    // (from, to]: the exit's own instant stays with the closed journey
    let rows = history(
        c,
        users,
        names,
        from + 1,
        to,
        None,
        "reading entries after a late exit",
    );
    for (ti, user, key, x, last, id) in wanted {
        let t = &triggers[ti].trigger;
        let st = steps
            .get_mut(&(ti, user.clone()))
            .expect("wanted comes from steps");
        for (u, event, at, props) in &rows {
            if *u != user
                || *at <= x
                || *at > last
                || !t.enters(event, props)
                || t.key_of(props) != key
            {
                continue;
            }
            // an entry of this very statement is already a step
            if st
                .iter()
                .any(|s| matches!(s, Step::Entry { at: a, key: k, .. } if a == at && *k == key))
            {
                continue;
            }
            batch.users.push(Some(u.clone()));
            batch.events.push(Some(event.clone()));
            batch.times.push(Some(ts(*at)));
            batch.props.push(Some(JsonB(props.clone())));
            st.push(Step::Entry {
                at: *at,
                key: key.clone(),
                event: batch.users.len() - 1,
            });
            *moved.entry(id).or_insert(0) += 1;
        }
    }
    moved
}

/// For triggers that limit re-entry: when each (trigger, user, key) last
/// ended a journey, read once for the batch.
fn ended_journeys(
    c: &pgrx::spi::SpiClient<'_>,
    steps: &BTreeMap<(usize, String), Vec<Step>>,
    triggers: &[LiveTrigger],
    first: i64,
    step_column: bool,
) -> HashMap<(String, String), HashMap<String, i64>> {
    // (trigger, user, key) of every entry of a trigger that limits re-entry
    let mut wanted = std::collections::BTreeSet::new();
    for ((ti, u), st) in steps {
        let t = &triggers[*ti].trigger;
        if matches!(t.reentry, Reentry::Once | Reentry::Cooldown(_)) {
            for s in st {
                if let Step::Entry { key, .. } = s {
                    wanted.insert((t.name.clone(), u.clone(), key.clone()));
                }
            }
        }
    }
    let mut out: HashMap<(String, String), HashMap<String, i64>> = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let (mut w_t, mut w_u, mut w_k) = (vec![], vec![], vec![]);
    for (t, u, k) in wanted {
        w_t.push(t);
        w_u.push(u);
        w_k.push(k);
    }
    // The journeys of one key follow each other (an entry joins an open one),
    // so the last one entered is the last one ended: one index probe per key
    // instead of a heavy user's whole history. A journey still waiting but
    // due before the batch (not read as open) has ended for this purpose.
    // a journey of steps ends with its last step's row (a schema older than
    // the library, before ALTER EXTENSION UPDATE, has no steps)
    static WITH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static WITHOUT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text: &'static str = if step_column {
        WITH.get_or_init(|| ENDED_JOURNEYS.replace("/*step*/", ", e.step DESC"))
    } else {
        WITHOUT.get_or_init(|| ENDED_JOURNEYS.replace("/*step*/", ""))
    };
    let rows = run(
        c,
        text,
        &[w_t.into(), w_u.into(), w_k.into(), ts(first).into()],
        "reading ended enrollments",
    );
    for r in rows {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        let end: TimestampWithTimeZone = r.get(4).ok().flatten().expect("max of a non-null column");
        out.entry((s(1), s(2)))
            .or_default()
            .insert(s(3), micros(end));
    }
    out
}

const ENDED_JOURNEYS: &str = "SELECT p.trigger, p.user_id, p.key, l.ended
           FROM unnest($1::text[], $2::text[], $3::text[]) AS p(trigger, user_id, key)
           CROSS JOIN LATERAL (
                SELECT coalesce(e.exited_at, e.due_at) AS ended FROM nudge.enrollments e
                 WHERE e.user_id = p.user_id AND e.trigger = p.trigger AND e.key = p.key
                   AND (e.state <> 'waiting' OR e.due_at < $4)
                 ORDER BY e.entered_at DESC /*step*/ LIMIT 1) l";

/// Entry and exit steps per (trigger index, user), from one pass over the batch.
fn steps_of(b: &Batch, triggers: &[LiveTrigger]) -> BTreeMap<(usize, String), Vec<Step>> {
    let empty = Value::Object(Default::default());
    let mut out: BTreeMap<(usize, String), Vec<Step>> = BTreeMap::new();
    for i in 0..b.users.len() {
        let (Some(Some(user)), Some(Some(event)), Some(Some(at))) =
            (b.users.get(i), b.events.get(i), b.times.get(i))
        else {
            continue;
        };
        let props = b
            .props
            .get(i)
            .and_then(|p| p.as_ref())
            .map_or(&empty, |p| &p.0);
        let at = micros(*at);
        // infinity, year 200000: no journey can be scheduled from it
        if !nudge_core::time::is_event_time(at) {
            continue;
        }
        for (ti, lt) in triggers.iter().enumerate() {
            let t = &lt.trigger;
            if lt.active && t.enters(event, props) {
                out.entry((ti, user.clone()))
                    .or_default()
                    .push(Step::Entry {
                        at,
                        key: t.key_of(props),
                        event: i,
                    });
            }
            if let Some(key) = t.exit_scope(event, props) {
                out.entry((ti, user.clone())).or_default().push(Step::Exit {
                    at,
                    key,
                    name: event.clone(),
                    event: i,
                });
            }
        }
    }
    out
}

/// Column arrays for the three writes of a capture.
#[derive(Default)]
struct Writes {
    // new enrollments
    n_trigger: Vec<String>,
    n_version: Vec<i32>,
    n_user: Vec<String>,
    n_key: Vec<String>,
    n_entered: Vec<TimestampWithTimeZone>,
    n_due: Vec<TimestampWithTimeZone>,
    n_anchor: Vec<JsonB>,
    n_anchor_event: Vec<String>,
    n_coalesced: Vec<i32>,
    n_last_entry: Vec<TimestampWithTimeZone>,
    n_exited: Vec<Option<TimestampWithTimeZone>>,
    /// Whether the exit ends the enrollment now (else a later step).
    n_closes: Vec<bool>,
    n_reason: Vec<Option<String>>,
    n_variant: Vec<Option<String>>,
    // changes to waiting enrollments
    u_id: Vec<i64>,
    u_user: Vec<String>,
    u_coalesced: Vec<i32>,
    u_last_entry: Vec<Option<TimestampWithTimeZone>>,
    u_exited: Vec<Option<TimestampWithTimeZone>>,
    u_closes: Vec<bool>,
    u_reason: Vec<Option<String>>,
    // journal lines; a line about a journey this statement opens names it by
    // j_new (its index above) and gets its id from the INSERT at flush
    j_user: Vec<String>,
    j_trigger: Vec<String>,
    j_enrollment: Vec<Option<i64>>,
    j_new: Vec<Option<usize>>,
    j_at: Vec<TimestampWithTimeZone>,
    j_step: Vec<String>,
    j_detail: Vec<Option<String>>,
    j_rule: Vec<Option<String>>,
    // turned-away entries: (user, trigger, rule) -> (first, last, count, first reason)
    notes: BTreeMap<(String, String, Rule), (i64, i64, usize, String)>,
}

impl Writes {
    fn add(
        &mut self,
        t: &nudge_core::definition::Trigger,
        user: &str,
        j: Journey,
        (due, closes): (i64, bool),
        b: &Batch,
        winner: Option<&str>,
    ) {
        let arm = t.arm_with_winner(user, winner);
        let exit_reason = j
            .exited
            .as_ref()
            .map(|(_, name)| format!("exited by {name}"));
        let exited_at = j.exited.as_ref().map(|(at, _)| ts(*at));
        let new_index = match j.id {
            None => {
                let anchor = j.anchor.expect("a new journey has an anchor event");
                self.n_trigger.push(t.name.clone());
                self.n_version.push(t.version);
                self.n_user.push(user.to_owned());
                self.n_key.push(j.key.clone());
                self.n_entered.push(ts(j.entered_at));
                // the journey's first step (j.due_at is where the whole journey ends)
                self.n_due.push(ts(due));
                self.n_anchor.push(
                    b.props[anchor]
                        .as_ref()
                        .map_or(JsonB(Value::Object(Default::default())), |p| {
                            JsonB(p.0.clone())
                        }),
                );
                self.n_anchor_event
                    .push(b.events[anchor].clone().unwrap_or_default());
                self.n_coalesced.push(j.coalesced.len() as i32);
                self.n_last_entry
                    .push(ts(j.coalesced.last().copied().unwrap_or(j.entered_at)));
                self.n_exited.push(exited_at);
                self.n_closes.push(closes);
                self.n_reason.push(exit_reason.clone());
                self.n_variant.push(arm.clone());
                Some(self.n_trigger.len() - 1)
            }
            Some(id) => {
                self.u_id.push(id);
                self.u_user.push(user.to_owned());
                self.u_coalesced.push(j.coalesced.len() as i32);
                self.u_last_entry.push(j.coalesced.last().map(|at| ts(*at)));
                self.u_exited.push(exited_at);
                self.u_closes.push(closes);
                self.u_reason.push(exit_reason.clone());
                None
            }
        };
        let mut line = |at: i64, step: &str, detail: Option<String>| {
            self.j_user.push(user.to_owned());
            self.j_trigger.push(t.name.clone());
            self.j_enrollment.push(j.id);
            self.j_new.push(new_index);
            self.j_at.push(ts(at));
            self.j_step.push(step.to_owned());
            self.j_rule
                .push((step == "exited").then(|| Rule::Exit.name().to_owned()));
            self.j_detail.push(detail);
        };
        // No "entered" line: nudge.explain reads entries from the enrollments
        // themselves (a bulk load would write one line per journey otherwise).
        for at in &j.coalesced {
            line(
                *at,
                "coalesced",
                Some("entry event joined the open enrollment".into()),
            );
        }
        if let Some((at, name)) = &j.exited {
            line(*at, "exited", Some(format!("exit event {name}")));
        }
    }

    /// Entries that an earlier statement coalesced into this journey and that
    /// now belong to a journey of their own.
    fn uncoalesce(&mut self, id: i64, n: i32) {
        if let Some(i) = self.u_id.iter().position(|x| *x == id) {
            self.u_coalesced[i] -= n;
        }
    }

    /// An entry that was turned away. A statement's refusals of one user by
    /// one trigger for one rule make one journal line: the first refusal's
    /// reason, and how many there were.
    fn note(&mut self, user: &str, trigger: &str, at: i64, rule: Rule, detail: String) {
        let n = self
            .notes
            .entry((user.to_owned(), trigger.to_owned(), rule))
            .or_insert((at, at, 0, detail.clone()));
        if at < n.0 {
            n.0 = at;
            n.3 = detail;
        }
        n.1 = n.1.max(at);
        n.2 += 1;
    }

    fn flush(mut self, c: &mut pgrx::spi::SpiClient<'_>) {
        for ((user, trigger, rule), (first, last, n, detail)) in std::mem::take(&mut self.notes) {
            self.j_user.push(user);
            self.j_trigger.push(trigger);
            self.j_enrollment.push(None);
            self.j_new.push(None);
            self.j_at.push(ts(first));
            self.j_step.push("not entered".to_owned());
            self.j_rule.push(Some(rule.name().to_owned()));
            self.j_detail.push(Some(if n == 1 {
                detail
            } else {
                format!(
                    "{detail} ({n} entry events, the last at {})",
                    nudge_core::time::format_pg_utc(last)
                )
            }));
        }
        if self.n_trigger.is_empty() && self.u_id.is_empty() && self.j_user.is_empty() {
            return;
        }
        // A line about a journey opened by this very statement names it by
        // its unique (user, trigger, key, entered_at); the INSERT's RETURNING
        // gives its id.
        let (mut j_key, mut j_entered) = (vec![], vec![]);
        for n in &self.j_new {
            j_key.push(n.map(|i| self.n_key[i].clone()));
            j_entered.push(n.map(|i| self.n_entered[i]));
        }
        // one statement for the three writes: on a single-row insert the
        // round trips through SPI cost more than the rows
        let text = write_journeys(crate::catalog::live_triggers(c).rule_columns);
        run(
            c,
            text,
            &[
                self.n_trigger.into(),
                self.n_version.into(),
                self.n_user.into(),
                self.n_key.into(),
                self.n_entered.into(),
                self.n_due.into(),
                self.n_anchor.into(),
                self.n_anchor_event.into(),
                self.n_coalesced.into(),
                self.n_last_entry.into(),
                self.n_exited.into(),
                self.n_reason.into(),
                self.n_variant.into(),
                self.u_id.into(),
                self.u_user.into(),
                self.u_coalesced.into(),
                self.u_last_entry.into(),
                self.u_exited.into(),
                self.u_reason.into(),
                self.j_user.into(),
                self.j_trigger.into(),
                self.j_enrollment.into(),
                j_key.into(),
                j_entered.into(),
                self.j_at.into(),
                self.j_step.into(),
                self.j_detail.into(),
                self.j_rule.into(),
                self.n_closes.into(),
                self.u_closes.into(),
            ],
            "writing journeys",
        );
    }
}

/// The statement that writes a capture's journeys, with the rule columns or,
/// against a schema older than the library (before ALTER EXTENSION UPDATE),
/// without them.
fn write_journeys(with_rule: bool) -> &'static str {
    static WITH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static WITHOUT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let fill = |on: bool| {
        let pick = |text: &'static str| if on { text } else { "" };
        WRITE_JOURNEYS
            .replace("/*rule*/", pick(", rule"))
            .replace(
                "/*exit rule*/",
                pick(", CASE WHEN exited_at IS NOT NULL AND closes THEN 'exit' END"),
            )
            .replace(
                "/*set rule*/",
                pick("rule = CASE WHEN u.exited_at IS NOT NULL AND u.closes THEN 'exit' ELSE e.rule END,"),
            )
            .replace("/*l.rule*/", pick(", l.rule"))
    };
    if with_rule {
        WITH.get_or_init(|| fill(true))
    } else {
        WITHOUT.get_or_init(|| fill(false))
    }
}

/// The journeys, their updates and the journal lines of one capture, in one
/// statement. Ids are drawn from the sequences by name, not by the columns'
/// identity default: a Citus shard has no such default (docs/citus.md).
const WRITE_JOURNEYS: &str = "WITH n AS (
                 INSERT INTO nudge.enrollments
                   (id, trigger, trigger_version, user_id, key, entered_at, due_at, anchor, anchor_event,
                    coalesced, last_entry_at, exited_at, state /*rule*/, reason, variant)
                 SELECT nextval('nudge.enrollments_id_seq'), trigger, version, user_id, key, entered_at,
                        due_at, anchor, anchor_event, coalesced, last_entry_at, exited_at,
                        CASE WHEN exited_at IS NOT NULL AND closes THEN 'exited' ELSE 'waiting' END
                        /*exit rule*/, reason, variant
                   FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::timestamptz[],
                               $6::timestamptz[], $7::jsonb[], $8::text[], $9::int[], $10::timestamptz[],
                               $11::timestamptz[], $12::text[], $13::text[], $29::bool[])
                     AS n(trigger, version, user_id, key, entered_at, due_at, anchor, anchor_event,
                          coalesced, last_entry_at, exited_at, reason, variant, closes)
                 -- a journey of this trigger, user and key already began at
                 -- this very instant (two orders on one day of a date column):
                 -- it is that journey, and the application's INSERT goes on
                 -- (no conflict target: the unique key gained the step in 0.9.0,
                 -- and capture must not fail before ALTER EXTENSION UPDATE)
                 ON CONFLICT DO NOTHING
                 RETURNING id, user_id, trigger, key, entered_at),
             u AS (
                 UPDATE nudge.enrollments e
                    SET coalesced = e.coalesced + u.coalesced,
                        last_entry_at = greatest(e.last_entry_at, u.last_entry_at),
                        exited_at = coalesce(u.exited_at, e.exited_at),
                        state = CASE WHEN u.exited_at IS NOT NULL AND u.closes THEN 'exited' ELSE e.state END,
                        /*set rule*/
                        reason = coalesce(u.reason, e.reason),
                        updated_at = now()
                   FROM unnest($14::bigint[], $15::text[], $16::int[], $17::timestamptz[], $18::timestamptz[], $19::text[],
                               $30::bool[])
                     AS u(id, user_id, coalesced, last_entry_at, exited_at, reason, closes)
                  WHERE e.user_id = u.user_id AND e.id = u.id
                 RETURNING 1),
             j AS (
                 INSERT INTO nudge.journal (id, user_id, trigger, enrollment_id, at, step, detail /*rule*/)
                 SELECT nextval('nudge.journal_id_seq'), l.user_id, l.trigger, coalesce(l.enrollment_id, n.id), l.at, l.step, l.detail /*l.rule*/
                   FROM unnest($20::text[], $21::text[], $22::bigint[], $23::text[], $24::timestamptz[],
                               $25::timestamptz[], $26::text[], $27::text[], $28::text[])
                     AS l(user_id, trigger, enrollment_id, new_key, new_entered, at, step, detail, rule)
                   LEFT JOIN n ON n.user_id = l.user_id AND n.trigger = l.trigger
                              AND n.key = l.new_key AND n.entered_at = l.new_entered
                 RETURNING 1)
             SELECT (SELECT count(*) FROM n), (SELECT count(*) FROM u), (SELECT count(*) FROM j)";
