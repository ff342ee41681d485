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

#[cfg(test)]
mod tests {
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
