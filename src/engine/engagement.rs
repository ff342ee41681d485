//! What a journey's earlier steps did (sent, delivered, opened, clicked), as
//! a later step's branch reads it. Only what happened by the step's due time
//! counts: a live pass that runs late and a backtest run a month later see
//! the same facts.

use crate::spi_util::{run, ts};
use nudge_core::definition::Trigger;
use nudge_core::flow::Engagement;
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// One journey at one step: (user, key, entered_at).
pub struct At<'a> {
    pub trigger: &'a Trigger,
    /// The trigger's name in `nudge.enrollments` (a backtest reads the live
    /// trigger's journeys under the name it was given).
    pub stored_as: &'a str,
    pub user: &'a str,
    pub key: &'a str,
    pub entered_at: i64,
    pub step: usize,
    /// The anchor's props and the recipient's zone: a date entry's steps are
    /// due from the date, at a local time.
    pub anchor: &'a serde_json::Value,
    pub tz: nudge_core::policy::Tz,
}

/// Per index of `at`, the engagement of its journey's earlier steps by
/// step name. Journeys whose step has no branch are not looked up.
pub fn engagement(
    c: &pgrx::spi::SpiClient<'_>,
    at: &[At<'_>],
) -> HashMap<usize, BTreeMap<String, Engagement>> {
    let mut out: HashMap<usize, BTreeMap<String, Engagement>> = HashMap::new();
    let wanted: Vec<usize> = (0..at.len())
        .filter(|i| {
            let a = &at[*i];
            a.step > 0
                && a.trigger
                    .steps
                    .get(a.step)
                    .is_some_and(|s| s.when.is_some())
        })
        .collect();
    if wanted.is_empty() {
        return out;
    }
    let col = |f: &dyn Fn(&At<'_>) -> String| wanted.iter().map(|i| f(&at[*i])).collect::<Vec<_>>();
    let idx: Vec<i32> = wanted.iter().map(|i| *i as i32).collect();
    let entered: Vec<TimestampWithTimeZone> =
        wanted.iter().map(|i| ts(at[*i].entered_at)).collect();
    let step: Vec<i32> = wanted.iter().map(|i| at[*i].step as i32).collect();
    let due: Vec<TimestampWithTimeZone> = wanted
        .iter()
        .map(|i| {
            let a = &at[*i];
            let due = a.trigger.step_due(a.step, a.entered_at, a.anchor, a.tz);
            ts(due.unwrap_or(a.entered_at))
        })
        .collect();
    let rows = run(
        c,
        "SELECT b.i, s.step,
                coalesce(s.state = 'sent' AND s.sent_at <= b.due, false),
                coalesce(o.delivered_at <= b.due, false),
                coalesce(o.opened_at <= b.due, false),
                coalesce(o.clicked_at <= b.due, false)
           FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int[], $7::timestamptz[])
             AS b(i, user_id, trigger, key, entered_at, step, due)
           JOIN nudge.enrollments s ON s.user_id = b.user_id AND s.trigger = b.trigger AND s.key = b.key
                                   AND s.entered_at = b.entered_at AND s.step < b.step
           LEFT JOIN nudge.outbox o ON o.message_key = s.message_key AND o.user_id = s.user_id",
        &[
            idx.into(),
            col(&|a| a.user.to_owned()).into(),
            col(&|a| a.stored_as.to_owned()).into(),
            col(&|a| a.key.to_owned()).into(),
            entered.into(),
            step.into(),
            due.into(),
        ],
        "reading engagement with earlier steps",
    );
    for r in rows {
        let i = r.get::<i32>(1).ok().flatten().unwrap_or_default() as usize;
        let k = r.get::<i32>(2).ok().flatten().unwrap_or_default() as usize;
        let b = |n| r.get::<bool>(n).ok().flatten().unwrap_or(false);
        if let Some(s) = at[i].trigger.steps.get(k) {
            out.entry(i).or_default().insert(
                s.name.clone(),
                Engagement {
                    sent: b(3),
                    delivered: b(4),
                    opened: b(5),
                    clicked: b(6),
                },
            );
        }
    }
    // an earlier step never reached (a branch jumped over it) reads as all false
    for i in wanted {
        let e = out.entry(i).or_default();
        let steps = &at[i].trigger.steps;
        for s in &steps[..at[i].step.min(steps.len())] {
            e.entry(s.name.clone()).or_default();
        }
    }
    out
}
