//! Event-time sequencing of one trigger's journeys for one user.
//!
//! A journey (enrollment) is open from its anchor's time until its due time
//! or its exit. Entry events inside an open journey of the same key coalesce;
//! an exit event at or after the anchor and before the due time closes it;
//! an entry after the journey ended (due or exited) opens a new one. Because
//! the rule only looks at event times, feeding a month of history in one
//! batch gives the journeys that living through that month gives, whatever
//! `run_due` did in between.

use crate::definition::Reentry;
use std::collections::HashMap;

/// Times are microseconds on any fixed epoch.
pub type Micros = i64;

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An entry event; `event` is the caller's index of it (its props become the anchor).
    Entry {
        at: Micros,
        key: String,
        event: usize,
    },
    /// An exit event; `key: None` closes journeys of every key. `event` is
    /// the caller's index: an event that is an entry too (a session, in "a
    /// session, then none for 7 days") closes the journeys before it and opens
    /// its own, which it does not close.
    Exit {
        at: Micros,
        key: Option<String>,
        name: String,
        event: usize,
    },
}

impl Step {
    pub fn at(&self) -> Micros {
        match self {
            Step::Entry { at, .. } | Step::Exit { at, .. } => *at,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Journey {
    /// The stored enrollment's id, or None for a journey this batch opens.
    pub id: Option<i64>,
    pub key: String,
    pub entered_at: Micros,
    pub due_at: Micros,
    /// For a new journey: the index of its anchor event.
    pub anchor: Option<usize>,
    /// Times of the entry events that joined this journey in this batch.
    pub coalesced: Vec<Micros>,
    /// Time and event name of the exit, when one closed it in this batch.
    pub exited: Option<(Micros, String)>,
}

impl Journey {
    pub fn open(id: i64, key: String, entered_at: Micros, due_at: Micros) -> Journey {
        Journey {
            id: Some(id),
            key,
            entered_at,
            due_at,
            anchor: None,
            coalesced: vec![],
            exited: None,
        }
    }

    /// Whether an event at `at` falls inside this journey's open window.
    /// A zero-wait journey still absorbs entries at its own instant.
    fn covers(&self, at: Micros) -> bool {
        self.exited.is_none()
            && self.entered_at <= at
            && (at < self.due_at || at == self.entered_at)
    }

    /// When the journey ends: its exit, else its due time.
    fn end(&self) -> Micros {
        self.exited.as_ref().map_or(self.due_at, |(at, _)| *at)
    }

    fn changed(&self) -> bool {
        self.id.is_none() || !self.coalesced.is_empty() || self.exited.is_some()
    }
}

/// An entry event that the trigger's re-entry rule turned away.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub at: Micros,
    pub key: String,
    pub rule: crate::decision::Rule,
    pub reason: String,
}

#[derive(Debug, Default, PartialEq)]
pub struct Sequenced {
    /// Journeys opened or changed.
    pub journeys: Vec<Journey>,
    pub blocked: Vec<Blocked>,
}

/// Applies `steps` to the user's waiting journeys of one trigger. `ended`
/// gives, per key, when the user's latest journey that is no longer waiting
/// ended (its exit, else its due time); re-entry rules read it. Entries sort
/// before exits at the same instant, so an exit at the anchor's own time closes
/// it, unless that exit is the anchor itself.
pub fn sequence(
    existing: Vec<Journey>,
    ended: &HashMap<String, Micros>,
    mut steps: Vec<Step>,
    wait: Micros,
    reentry: Reentry,
) -> Sequenced {
    // At one instant: exits by events that are entries too, then entries,
    // then other exits (so an exit at a cart's own time, from another event,
    // still closes it).
    let entries: std::collections::HashSet<usize> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Entry { event, .. } => Some(*event),
            Step::Exit { .. } => None,
        })
        .collect();
    steps.sort_by_key(|s| {
        let rank = match s {
            Step::Exit { event, .. } if entries.contains(event) => 0,
            Step::Entry { .. } => 1,
            Step::Exit { .. } => 2,
        };
        (s.at(), rank)
    });
    let mut journeys = existing;
    let mut blocked = vec![];
    // Indexes into `journeys`, so that a heavy user's thousands of steps stay
    // linear: per key, and the journeys an exit of any key may still close.
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, j) in journeys.iter().enumerate() {
        by_key.entry(j.key.clone()).or_default().push(i);
    }
    let mut closable: Vec<usize> = (0..journeys.len()).collect();
    for step in steps {
        match step {
            Step::Entry { at, key, event } => {
                let same_key = by_key.get(&key).map(Vec::as_slice).unwrap_or_default();
                let find = |f: &dyn Fn(&Journey) -> bool| {
                    same_key.iter().copied().find(|i| f(&journeys[*i]))
                };
                let open = match reentry {
                    // a journey per entry event; two at the same instant are one
                    Reentry::EveryTime => find(&|j| j.entered_at == at),
                    _ => find(&|j| j.covers(at)).or_else(|| {
                        // An entry that arrives late, before a journey already open for
                        // this key but within one wait of it, joins that journey rather
                        // than opening an overlapping one.
                        find(&|j| {
                            j.exited.is_none() && at < j.entered_at && at + wait > j.entered_at
                        })
                    }),
                };
                if let Some(i) = open {
                    journeys[i].coalesced.push(at);
                    continue;
                }
                let last_end = same_key
                    .iter()
                    .map(|i| &journeys[*i])
                    .filter(|j| j.entered_at <= at)
                    .map(Journey::end)
                    .chain(ended.get(&key).copied())
                    .max();
                let refusal = match (reentry, last_end) {
                    (Reentry::Once, Some(_)) => {
                        Some("reentry once: the user already had this journey".to_string())
                    }
                    (Reentry::Cooldown(c), Some(end)) if at < end + c => Some(format!(
                        "reentry cooldown: the previous journey ended {} ago",
                        crate::time::format_duration(at - end)
                    )),
                    _ => None,
                };
                match refusal {
                    Some(reason) => blocked.push(Blocked {
                        at,
                        key,
                        rule: crate::decision::Rule::Reentry,
                        reason,
                    }),
                    None => {
                        by_key.entry(key.clone()).or_default().push(journeys.len());
                        closable.push(journeys.len());
                        journeys.push(Journey {
                            id: None,
                            key,
                            entered_at: at,
                            due_at: at + wait,
                            anchor: Some(event),
                            coalesced: vec![],
                            exited: None,
                        });
                    }
                }
            }
            Step::Exit {
                at,
                key,
                name,
                event,
            } => {
                let candidates: &[usize] = match &key {
                    Some(k) => by_key.get(k).map(Vec::as_slice).unwrap_or_default(),
                    None => &closable,
                };
                // an entry that exits too closes only journeys from before it:
                // a twin at its own instant (a repeat delivery) is not "after"
                let strictly_after = entries.contains(&event);
                for i in candidates {
                    let j = &mut journeys[*i];
                    let after = j.entered_at < at || (j.entered_at == at && !strictly_after);
                    if j.exited.is_none() && after && at < j.due_at {
                        j.exited = Some((at, name.clone()));
                    }
                }
                // steps come in time order: a journey due by now, or exited,
                // is closed by no later exit
                closable.retain(|i| journeys[*i].exited.is_none() && journeys[*i].due_at > at);
            }
        }
    }
    journeys.retain(Journey::changed);
    Sequenced { journeys, blocked }
}

/// For "enter on the n-th matching event within a window": keeps an entry
/// step only when `history` (time and key of every matching entry event,
/// the step's own included) holds at least `min_count` of its key in
/// [at - within, at].
pub fn keep_repeated(
    steps: &mut Vec<Step>,
    history: &[(Micros, String)],
    min_count: u32,
    within: Micros,
) {
    // times per key, sorted: each step counts its window by two binary
    // searches (a heavy user's history is tens of thousands of events)
    let mut by_key: std::collections::HashMap<&str, Vec<Micros>> = Default::default();
    for (at, key) in history {
        by_key.entry(key.as_str()).or_default().push(*at);
    }
    for times in by_key.values_mut() {
        times.sort_unstable();
    }
    steps.retain(|s| match s {
        Step::Entry { at, key, .. } => {
            let times = by_key
                .get(key.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let first = times.partition_point(|e| *e < at - within);
            let last = times.partition_point(|e| e <= at);
            last.saturating_sub(first) as u32 >= min_count
        }
        Step::Exit { .. } => true,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Micros = 3_600_000_000;

    fn run(existing: Vec<Journey>, steps: Vec<Step>, wait: Micros) -> Vec<Journey> {
        sequence(existing, &HashMap::new(), steps, wait, Reentry::AfterExit).journeys
    }

    fn entry(at: Micros, key: &str, event: usize) -> Step {
        Step::Entry {
            at,
            key: key.into(),
            event,
        }
    }
    fn exit(at: Micros, key: Option<&str>) -> Step {
        Step::Exit {
            at,
            key: key.map(Into::into),
            name: "purchased".into(),
            event: usize::MAX,
        }
    }

    #[test]
    fn a_twin_of_the_anchor_at_its_instant_does_not_close_it() {
        // a session delivered twice, the second in a later statement
        let twin = vec![
            entry(0, "", 0),
            Step::Exit {
                at: 0,
                key: None,
                name: "session".into(),
                event: 0,
            },
        ];
        for reentry in [Reentry::AfterExit, Reentry::EveryTime] {
            let open = Journey::open(7, String::new(), 0, 24 * H);
            let out = sequence(vec![open], &HashMap::new(), twin.clone(), 24 * H, reentry).journeys;
            assert!(
                out.iter().all(|j| j.exited.is_none()),
                "{reentry:?}: {out:?}"
            );
        }
    }

    #[test]
    fn an_event_that_enters_and_exits_restarts_the_journey() {
        // "a session, then no session for a day": each session closes the
        // journey before it and opens its own, which it leaves open
        let session = |at: Micros, event: usize| {
            vec![
                entry(at, "", event),
                Step::Exit {
                    at,
                    key: None,
                    name: "session".into(),
                    event,
                },
            ]
        };
        for reentry in [Reentry::AfterExit, Reentry::EveryTime] {
            let steps = [session(0, 0), session(H, 1)].concat();
            let out = sequence(vec![], &HashMap::new(), steps, 24 * H, reentry).journeys;
            assert_eq!(out.len(), 2, "{reentry:?}: {out:?}");
            assert_eq!(out[0].exited, Some((H, "session".into())));
            assert_eq!((out[1].entered_at, &out[1].exited), (H, &None));
        }
    }

    #[test]
    fn repeated_entry_coalesces_and_exit_closes() {
        let out = run(
            vec![],
            vec![
                entry(0, "c1", 0),
                entry(H, "c1", 1),
                exit(2 * H, Some("c1")),
            ],
            24 * H,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].coalesced, vec![H]);
        assert_eq!(out[0].exited, Some((2 * H, "purchased".into())));
    }

    #[test]
    fn exit_of_another_key_does_not_close() {
        let out = run(vec![], vec![entry(0, "c1", 0), exit(H, Some("c2"))], 24 * H);
        assert_eq!(out[0].exited, None);
    }

    #[test]
    fn exit_after_due_does_not_close_and_entry_after_due_reopens() {
        let out = run(
            vec![],
            vec![
                entry(0, "c1", 0),
                exit(25 * H, None),
                entry(26 * H, "c1", 1),
            ],
            24 * H,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].exited, None);
        assert_eq!(out[1].entered_at, 26 * H);
        assert_eq!(out[1].anchor, Some(1));
    }

    #[test]
    fn entry_after_exit_reopens() {
        let out = run(
            vec![],
            vec![entry(0, "c1", 0), exit(H, None), entry(2 * H, "c1", 1)],
            24 * H,
        );
        assert_eq!(out.len(), 2);
        assert!(out[0].exited.is_some() && out[1].exited.is_none());
    }

    #[test]
    fn exit_at_the_anchor_instant_counts() {
        let out = run(vec![], vec![exit(0, None), entry(0, "", 0)], H);
        assert!(out[0].exited.is_some());
    }

    #[test]
    fn one_batch_equals_one_event_at_a_time() {
        let steps = vec![
            entry(0, "a", 0),
            entry(H, "b", 1),
            entry(2 * H, "a", 2),
            exit(3 * H, Some("b")),
            entry(5 * H, "a", 3),
            exit(6 * H, None),
            entry(30 * H, "b", 4),
        ];
        let batch = run(vec![], steps.clone(), 4 * H);
        // Living through: feed the steps one by one, carrying the still-open journeys.
        let mut open: Vec<Journey> = vec![];
        let mut all: Vec<Journey> = vec![];
        let mut next_id = 100;
        for s in steps {
            for j in run(open.clone(), vec![s], 4 * H) {
                match j.id {
                    Some(id) => {
                        let k = all.iter_mut().find(|x| x.id == Some(id)).unwrap();
                        k.coalesced.extend(j.coalesced.iter());
                        k.exited = j.exited.clone();
                    }
                    None => {
                        let mut j = j;
                        j.id = Some(next_id);
                        next_id += 1;
                        all.push(j);
                    }
                }
            }
            open = all
                .iter()
                .filter(|j| j.exited.is_none())
                .map(|j| Journey::open(j.id.unwrap(), j.key.clone(), j.entered_at, j.due_at))
                .collect();
        }
        let summary = |js: &[Journey]| -> Vec<(String, Micros, Vec<Micros>, bool)> {
            js.iter()
                .map(|j| {
                    (
                        j.key.clone(),
                        j.entered_at,
                        j.coalesced.clone(),
                        j.exited.is_some(),
                    )
                })
                .collect()
        };
        assert_eq!(summary(&batch), summary(&all));
        assert_eq!(batch.len(), 4);
    }

    #[test]
    fn repeated_entry_needs_enough_events_of_its_key_in_the_window() {
        let history = vec![
            (0, "a".to_string()),
            (H / 2, "a".to_string()),
            (H / 2, "b".to_string()),
            (2 * H, "a".to_string()),
        ];
        let mut steps = vec![
            entry(H / 2, "a", 1),
            entry(H / 2, "b", 2),
            entry(2 * H, "a", 3),
            exit(3 * H, None),
        ];
        keep_repeated(&mut steps, &history, 2, H);
        // a at 1/2 h: two a's within the hour; b: one; a at 2 h: the one at 1/2 h is 1.5 h back
        assert_eq!(steps, vec![entry(H / 2, "a", 1), exit(3 * H, None)]);
    }

    #[test]
    fn reentry_once_refuses_a_second_journey_even_after_history() {
        let s = sequence(
            vec![],
            &HashMap::new(),
            vec![entry(0, "a", 0), entry(30 * H, "a", 1)],
            H,
            Reentry::Once,
        );
        assert_eq!(s.journeys.len(), 1);
        assert_eq!(s.blocked.len(), 1);
        assert!(s.blocked[0].reason.starts_with("reentry once"));
        let ended = HashMap::from([("a".to_string(), -100 * H)]);
        let s = sequence(vec![], &ended, vec![entry(0, "a", 0)], H, Reentry::Once);
        assert!(s.journeys.is_empty() && s.blocked.len() == 1);
        let s = sequence(vec![], &ended, vec![entry(0, "b", 0)], H, Reentry::Once);
        assert_eq!(s.journeys.len(), 1, "another key is another journey");
    }

    #[test]
    fn reentry_cooldown_counts_from_the_previous_end() {
        let c = Reentry::Cooldown(24 * H);
        // journey 0..1h ends at 1h; an entry at 10h is inside the cooldown, at 26h outside
        let s = sequence(
            vec![],
            &HashMap::new(),
            vec![entry(0, "", 0), entry(10 * H, "", 1), entry(26 * H, "", 2)],
            H,
            c,
        );
        assert_eq!(
            s.journeys.iter().map(|j| j.entered_at).collect::<Vec<_>>(),
            vec![0, 26 * H]
        );
        assert_eq!(s.blocked.len(), 1);
        assert!(
            s.blocked[0].reason.contains("ended 9 hours ago"),
            "{}",
            s.blocked[0].reason
        );
        // an exited journey ends at its exit
        let s = sequence(
            vec![],
            &HashMap::new(),
            vec![entry(0, "", 0), exit(H / 2, None), entry(25 * H, "", 1)],
            2 * H,
            c,
        );
        assert_eq!(s.journeys.len(), 2);
    }

    #[test]
    fn reentry_every_time_opens_a_journey_per_entry() {
        let s = sequence(
            vec![],
            &HashMap::new(),
            vec![entry(0, "a", 0), entry(H, "a", 1), entry(H, "a", 2)],
            24 * H,
            Reentry::EveryTime,
        );
        assert_eq!(s.journeys.len(), 2);
        assert_eq!(
            s.journeys[1].coalesced,
            vec![H],
            "the same instant is the same journey"
        );
    }

    #[test]
    fn existing_open_journey_absorbs_entries_and_unchanged_ones_are_not_returned() {
        let existing = vec![
            Journey::open(7, "c1".into(), 0, 24 * H),
            Journey::open(8, "c2".into(), 0, 24 * H),
        ];
        let out = run(existing, vec![entry(H, "c1", 0)], 24 * H);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, Some(7));
        assert_eq!(out[0].coalesced, vec![H]);
    }
}
