//! Replaying a definition over a user's history, without a server: the same
//! entry, exit, repeated-entry, re-entry and wait rules that capture applies
//! live, so that a backtest of a live trigger agrees with what it did.

use crate::definition::Trigger;
use crate::sequence::{keep_repeated, sequence, Blocked, Journey, Micros, Step};
use serde_json::Value;
use std::collections::HashMap;

/// One event of the user: name, time, props. Sorted by time.
pub type Event = (String, Micros, Value);

#[derive(Debug, Default)]
pub struct UserReplay {
    pub journeys: Vec<Journey>,
    pub blocked: Vec<Blocked>,
}

/// Journeys the trigger would have opened for one user from entry events in
/// [from, to). Events before `from` only count for `min_count` windows; re-entry
/// rules see only journeys of the period.
pub fn replay_user(t: &Trigger, events: &[Event], from: Micros, to: Micros) -> UserReplay {
    let mut steps = Vec::new();
    let mut entries: Vec<(Micros, String)> = Vec::new();
    for (i, (name, at, props)) in events.iter().enumerate() {
        if t.enters(name, props) {
            entries.push((*at, t.key_of(props)));
            if *at >= from && *at < to {
                steps.push(Step::Entry {
                    at: *at,
                    key: t.key_of(props),
                    event: i,
                });
            }
        }
        if *at >= from && *at < to {
            if let Some(key) = t.exit_scope(name, props) {
                steps.push(Step::Exit {
                    at: *at,
                    key,
                    name: name.clone(),
                    event: i,
                });
            }
        }
    }
    if let Some((n, within)) = t.entry_count {
        keep_repeated(&mut steps, &entries, n, within);
    }
    let done = sequence(vec![], &HashMap::new(), steps, t.span_us(), t.reentry);
    UserReplay {
        journeys: done.journeys,
        blocked: done.blocked,
    }
}

/// A backtest's row: outcome, journeys, sample users, step.
pub type Outcome = (String, i64, Vec<String>, String);

/// Backtests of disjoint sets of users (a Citus cluster's shard groups and
/// nodes) as one: journeys summed per step and outcome, samples pooled up
/// to `samples`, in the order of the steps (`steps`), then of the outcomes.
pub fn merge_outcomes(parts: Vec<Vec<Outcome>>, steps: &[String], samples: usize) -> Vec<Outcome> {
    let mut merged: std::collections::BTreeMap<(usize, String, String), (i64, Vec<String>)> =
        std::collections::BTreeMap::new();
    for (outcome, n, users, step) in parts.into_iter().flatten() {
        let place = steps.iter().position(|s| *s == step).unwrap_or(usize::MAX);
        let e = merged.entry((place, outcome, step)).or_default();
        e.0 += n;
        for u in users {
            if e.1.len() < samples && !e.1.contains(&u) {
                e.1.push(u);
            }
        }
    }
    merged
        .into_iter()
        .map(|((_, outcome, step), (n, users))| (outcome, n, users, step))
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn outcomes_of_disjoint_users_merge_by_step_and_outcome() {
        let o = |outcome: &str, n: i64, users: &[&str], step: &str| {
            (
                outcome.to_string(),
                n,
                users.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
                step.to_string(),
            )
        };
        let steps = vec!["first".to_string(), "second".to_string()];
        let merged = super::merge_outcomes(
            vec![
                vec![
                    o("sent", 2, &["a", "b"], "first"),
                    o("exited", 1, &["c"], "second"),
                ],
                vec![
                    o("sent", 3, &["d", "e", "f"], "first"),
                    o("exited", 1, &["g"], "first"),
                ],
            ],
            &steps,
            4,
        );
        assert_eq!(
            merged,
            vec![
                o("exited", 1, &["g"], "first"),
                o("sent", 5, &["a", "b", "d", "e"], "first"),
                o("exited", 1, &["c"], "second"),
            ]
        );
    }
    use super::*;
    use crate::definition::Definition;
    use serde_json::json;

    const H: Micros = 3_600_000_000;

    #[test]
    fn replays_entries_exits_and_the_period() {
        let t = Definition::parse(&json!({
            "on": {"event": "cart_added", "key": "cart"}, "wait": "1 hour",
            "unless": [{"event": "purchased", "same_key": true}], "template": "t"}))
        .unwrap()
        .compile("t", 1)
        .unwrap();
        let ev = |n: &str, at: Micros, cart: &str| (n.to_string(), at, json!({"cart": cart}));
        let events = vec![
            ev("cart_added", -H, "old"), // before the period: not replayed
            ev("cart_added", 0, "a"),    // exited by its purchase
            ev("purchased", H / 2, "a"),
            ev("cart_added", 2 * H, "b"),     // due at 3 h
            ev("cart_added", 2 * H + 1, "b"), // coalesces
        ];
        let r = replay_user(&t, &events, 0, 10 * H);
        assert_eq!(r.journeys.len(), 2);
        assert!(r.journeys[0].exited.is_some());
        assert_eq!(
            (r.journeys[1].due_at, r.journeys[1].coalesced.len()),
            (3 * H, 1)
        );
    }
}
