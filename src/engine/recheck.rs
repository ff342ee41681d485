//! Messages written for later (quiet hours, a send window, a mailer's retry),
//! and messages still waiting minutes after their time (a mailer's backlog),
//! are looked at again before `claim` may hand them out:
//! an exit event that arrived while one waited (the purchase that came
//! while the reminder waited for the morning) cancels it. `claim` itself
//! looks at suppressions and at the trigger (docs/reference.md, "Claim").

use super::run_due::{exits_at_send_time, triggers_by_name, Due};
use crate::spi_util::run;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiClient;
use serde_json::Value;

/// How many held messages one pass looks at.
const BATCH: i32 = 5000;

/// Re-checks the held messages whose time is near; returns how many it
/// cancelled. The others are marked checked, which makes them claimable.
pub fn held_messages(c: &mut SpiClient<'_>) -> i32 {
    let rows = run(
        c,
        "SELECT o.id, o.user_id, o.trigger, e.id, e.key, e.entered_at, now(), e.step
           FROM nudge.outbox o
           -- retention may have deleted the journey: the message is still checked
           LEFT JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
          WHERE o.status = 'pending' AND o.available_at <= now() + interval '1 minute'
            -- claim wants a check in the last 5 minutes: renewed a minute early
            AND o.checked_at < now() - interval '4 minutes'
            -- a paused trigger's messages wait for its resume, not for a check
            AND NOT EXISTS (SELECT 1 FROM nudge.triggers t WHERE t.name = o.trigger AND t.status = 'paused')
          ORDER BY o.available_at
          LIMIT $1
            FOR UPDATE OF o SKIP LOCKED",
        &[BATCH.into()],
        "reading held messages",
    );
    let triggers = triggers_by_name(c);
    let (mut ids, mut users, mut due) = (vec![], vec![], vec![]);
    for r in rows {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        let id: i64 = r.get(1).ok().flatten().unwrap_or_default();
        let trigger = s(3);
        ids.push(id);
        users.push(s(2));
        // a dropped trigger's message is claim's to cancel
        let Some(entered_at) = r.get::<TimestampWithTimeZone>(6).ok().flatten() else {
            continue;
        };
        if !triggers.contains_key(&trigger) {
            continue;
        }
        let now: TimestampWithTimeZone = r.get(7).ok().flatten().expect("now()");
        due.push((
            ids.len() - 1,
            Due {
                id: r.get(4).ok().flatten().unwrap_or_default(),
                trigger,
                user_id: s(2),
                key: s(5),
                entered_at,
                due_at: now,
                anchor: Value::Null,
                message_key: String::new(),
                variant: None,
                attempts: 0,
                step: r.get::<i32>(8).ok().flatten().unwrap_or_default().max(0) as usize,
            },
        ));
    }
    if ids.is_empty() {
        return 0;
    }
    let (at, dues): (Vec<usize>, Vec<Due>) = due.into_iter().unzip();
    let exits = exits_at_send_time(c, &dues, &triggers);
    let mut exited_by: Vec<Option<String>> = vec![None; ids.len()];
    let mut exited_at: Vec<Option<TimestampWithTimeZone>> = vec![None; ids.len()];
    for (i, (when, event)) in exits {
        exited_by[at[i]] = Some(event);
        exited_at[at[i]] = Some(when);
    }
    let cancelled = exited_by.iter().flatten().count() as i32;
    run(
        c,
        "WITH x AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[])
                                AS x(id, user_id, event, at)),
              o AS (UPDATE nudge.outbox o
                       SET checked_at = now(),
                           status = CASE WHEN x.event IS NULL THEN o.status ELSE 'cancelled' END,
                           rule = CASE WHEN x.event IS NULL THEN o.rule ELSE 'exit' END,
                           last_error = CASE WHEN x.event IS NULL THEN o.last_error
                                             ELSE 'exited by ' || x.event || ' before it went out' END
                      FROM x
                     WHERE o.user_id = x.user_id AND o.id = x.id
                 RETURNING o.user_id, o.enrollment_id, x.event, x.at)
         UPDATE nudge.enrollments e
            SET state = 'exited', rule = 'exit', exited_at = o.at, updated_at = now(),
                reason = 'exited by ' || o.event || ' (found before the message went out)'
           FROM o
          WHERE o.event IS NOT NULL AND e.user_id = o.user_id AND e.id = o.enrollment_id",
        &[
            ids.into(),
            users.into(),
            exited_by.into(),
            exited_at.into(),
        ],
        "recording re-checked messages",
    );
    cancelled
}
