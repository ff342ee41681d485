//! Entries the profile starts (nudge_core::segment): a segment, or a date on
//! the profile. What the profile says for each such trigger (in the segment,
//! the date) is kept in `nudge.segment_members`; when a write of the profile,
//! or one of the trigger's `recheck_on` events, changes it (a segment: in the
//! trigger's direction), capture gets an entry event of the trigger's own
//! (`segment:<trigger>`, the profile as its props) and the journey goes on as
//! any other. The row changes once, under its row lock: two statements that
//! see the same change start one journey.

use crate::catalog::LiveTrigger;
use crate::engine::capture::Batch;
use crate::spi_util::{distinct, run, ts};
use nudge_core::definition::Trigger;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::HashMap;

/// The triggers the profile starts that may start journeys now.
pub fn triggers(all: &[LiveTrigger]) -> Vec<&Trigger> {
    all.iter()
        .filter(|l| l.active && l.trigger.watches_profile())
        .map(|l| &l.trigger)
        .collect()
}

/// Checks `who` (user, time of the change) against `segments`, records the
/// changes of membership, and returns the entry events of the journeys they
/// start.
pub fn changes(
    c: &pgrx::spi::SpiClient<'_>,
    segments: &[&Trigger],
    who: &[(String, i64)],
) -> Batch {
    let mut out = Batch::default();
    if segments.is_empty() || who.is_empty() {
        return out;
    }
    let at: HashMap<&str, i64> = who.iter().map(|(u, t)| (u.as_str(), *t)).collect();
    // in one order everywhere: two statements lock the rows they change
    // in the same order, and never deadlock
    let mut users = distinct(who.iter().map(|(u, _)| u.clone()));
    users.sort();
    let profiles = crate::engine::run_due::profiles_of(c, users.clone());
    let (mut t_names, mut t_users, mut members, mut values, mut since) =
        (vec![], vec![], vec![], vec![], vec![]);
    for t in segments {
        for u in &users {
            // a lookup that failed says nothing about membership
            let p = match profiles.get(u) {
                Some(Err(_)) => continue,
                Some(Ok(p)) => Some(p),
                None => None,
            };
            let (member, value) = t.profile_state(p);
            t_names.push(t.name.clone());
            t_users.push(u.clone());
            members.push(member);
            values.push(value);
            since.push(ts(at[u.as_str()]));
        }
    }
    let rows = run(
        c,
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::timestamptz[], $5::text[])
                              AS u(trigger, user_id, member, since, value))
         INSERT INTO nudge.segment_members AS s (trigger, user_id, member, since, value)
         SELECT u.trigger, u.user_id, u.member, u.since, u.value FROM u
          -- only a change is written (and its row locked): outside and never
          -- inside, or unchanged, there is nothing to write
          WHERE NOT EXISTS (SELECT 1 FROM nudge.segment_members x
                             WHERE x.user_id = u.user_id AND x.trigger = u.trigger
                               AND x.member = u.member AND x.value IS NOT DISTINCT FROM u.value)
            AND (u.member OR EXISTS (SELECT 1 FROM nudge.segment_members x
                                      WHERE x.user_id = u.user_id AND x.trigger = u.trigger))
          ORDER BY u.user_id, u.trigger
         ON CONFLICT (user_id, trigger) DO UPDATE
            SET member = EXCLUDED.member, value = EXCLUDED.value, since = EXCLUDED.since
          WHERE s.member IS DISTINCT FROM EXCLUDED.member OR s.value IS DISTINCT FROM EXCLUDED.value
         RETURNING s.trigger, s.user_id, s.member",
        &[t_names.into(), t_users.into(), members.into(), since.into(), values.into()],
        "recording segment membership",
    );
    for r in rows {
        let (Some(trigger), Some(user), Some(member)) = (
            r.get::<String>(1).ok().flatten(),
            r.get::<String>(2).ok().flatten(),
            r.get::<bool>(3).ok().flatten(),
        ) else {
            continue;
        };
        let Some(t) = segments.iter().find(|t| t.name == trigger) else {
            continue;
        };
        // a changed row was the other state before it; a new one, outside
        if !t.starts_on_change(member) {
            continue;
        }
        let props = profiles
            .get(&user)
            .and_then(|p| p.as_ref().ok())
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        out.times.push(Some(ts(at[user.as_str()])));
        out.users.push(Some(user));
        out.events.push(Some(t.entry_event.clone()));
        out.props.push(Some(JsonB(props)));
    }
    out
}

/// After a write of `nudge.profiles`: the users' segments, checked as the
/// extension. A failure here is a warning: the application's write goes on.
pub fn profiles_changed(users: Vec<String>) {
    // a large write (a COPY of profiles) is checked a part at a time, each in
    // a subtransaction of its own: a part that fails loses only its own checks
    for part in users.chunks(10_000) {
        crate::privilege::as_extension(|| {
            // the membership and the journeys it starts together, or neither: a
            // change kept without its journey would never start it
            let result = crate::isolate::subtransaction(|| {
                let batch = Spi::connect(|c| {
                    let catalog = crate::catalog::live_triggers(&c);
                    let segments = triggers(&catalog.triggers);
                    if segments.is_empty() {
                        return Batch::default();
                    }
                    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
                    let who: Vec<(String, i64)> = part.iter().map(|u| (u.clone(), now)).collect();
                    changes(&c, &segments, &who)
                });
                if !batch.users.is_empty() {
                    crate::engine::capture::capture(batch);
                }
            });
            if let Err(e) = result {
                warning!(
                    "pg_nudge: checking segments of {} users failed: {e}",
                    part.len()
                );
            }
        });
    }
}

/// When a segment trigger is defined: records who is in its segment now
/// (users of `nudge.profiles`), so that only later entries start journeys;
/// with `"backfill": "qualifying_now"`, they start theirs now. Returns how
/// many journeys started.
pub fn snapshot(t: &Trigger) -> i64 {
    if !t.watches_profile() {
        return 0;
    }
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let mut started = 0;
    let mut after = String::new();
    loop {
        let (batch, last) = Spi::connect(|c| {
            let users: Vec<String> = run(
                &c,
                "SELECT user_id FROM nudge.profiles WHERE user_id > $1 ORDER BY user_id LIMIT 10000",
                &[after.clone().into()],
                "reading profiles for a segment",
            )
            .filter_map(|r| r.get::<String>(1).ok().flatten())
            .collect();
            let last = users.last().cloned();
            let who: Vec<(String, i64)> = users.into_iter().map(|u| (u, now)).collect();
            (changes(&c, &[t], &who), last)
        });
        if t.backfills() && !batch.users.is_empty() {
            let users: Vec<String> = batch.users.iter().flatten().cloned().collect();
            crate::engine::capture::capture(batch);
            // what capture started (a paused trigger, the audience or
            // re-entry may have turned some away), each with its line
            started += Spi::connect_mut(|c| {
                run(
                    c,
                    "INSERT INTO nudge.journal (user_id, trigger, enrollment_id, at, step, detail)
                     SELECT e.user_id, e.trigger, e.id, e.entered_at, 'backfill',
                            'in the segment when the trigger was defined (backfill qualifying_now)'
                       FROM nudge.enrollments e
                      WHERE e.trigger = $1 AND e.user_id = ANY ($2) AND e.entered_at = $3 AND e.step = 0
                     RETURNING 1",
                    &[t.name.clone().into(), users.into(), ts(now).into()],
                    "journaling backfilled journeys",
                )
                .len() as i64
            });
        }
        match last {
            Some(l) => after = l,
            None => break,
        }
    }
    started
}
