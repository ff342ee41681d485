//! The claim of the outbox protocol (docs/reference.md, "Claim"), run on
//! each shard group of a node (`citus::each_group`), or once on a single
//! server. `nudge.claim` (sql/outbox.sql) calls it here, or, on a Citus
//! coordinator, on every node.
//!
//! The rows are picked by the index in priority order and updated by their
//! ctid (a TID scan): joined on the key instead, a generic plan (which cannot
//! know the batch size) hash-joined the whole outbox per claim.
//!
//! Right before a message is handed out, what can have changed since it was
//! written is looked at again: a suppressed address or user cancels it (rule
//! 'suppression'), so does a user who unsubscribed from its topic
//! ('consent'), a dropped trigger cancels it ('trigger_dropped'), a paused
//! trigger holds it. A message is claimable only when its exit events were
//! checked in the last 5 minutes: one held for later (quiet hours, a retry)
//! or waiting in a backlog is re-checked by run_due. One whose lease ran out
//! was checked when first claimed.

use crate::spi_util::{micros, run};
use nudge_core::claim_order::{shares, Place};
use pgrx::prelude::*;
use pgrx::JsonB;

/// The messages that may be claimed now, in claim order.
macro_rules! claimable {
    () => {
        "FROM nudge.outbox c
             WHERE c.status IN ('pending', 'claimed') AND c.available_at <= now()
               AND (c.status = 'claimed' OR c.checked_at >= now() - interval '5 minutes')
               AND NOT EXISTS (SELECT 1 FROM nudge.triggers t WHERE t.name = c.trigger AND t.status = 'paused')
             ORDER BY c.priority DESC, c.available_at, c.id
             LIMIT $1"
    };
}

/// The best claimable messages of a group, unlocked: where the node's batch
/// should come from.
const PEEK: &str = concat!("SELECT c.priority, c.available_at, c.id ", claimable!());

const PICK: &str = concat!(
    "SELECT coalesce(array_agg(p.row_id), '{}')::text
       FROM (SELECT c.ctid AS row_id ",
    claimable!(),
    " FOR UPDATE OF c SKIP LOCKED) p"
);

// A cancelled row's old version is gone for the claim below; its journey
// says why (trigger_stats does not count it as sent). A batch that was all
// cancelled comes back short: drop_trigger cancels its own messages in one
// statement, so a long run of them is not left to claim.
const CANCEL: &str = "
    WITH x AS (
        UPDATE nudge.outbox o
           SET status = 'cancelled', rule = x.rule, last_error = x.why
          FROM (SELECT c.ctid AS row_id,
                       CASE WHEN t.name IS NULL THEN 'trigger_dropped'
                            WHEN s.reason IS NOT NULL THEN 'suppression' ELSE 'consent' END AS rule,
                       CASE WHEN t.name IS NULL THEN 'trigger ' || c.trigger || ' was dropped'
                            WHEN s.reason IS NOT NULL THEN 'on the suppression list: ' || s.reason
                            ELSE u.why END AS why
                  FROM nudge.outbox c
                  LEFT JOIN nudge.triggers t ON t.name = c.trigger
                  LEFT JOIN LATERAL (SELECT s.reason FROM nudge.suppressions s
                                      WHERE s.email IN (lower(btrim(c.recipient)), nudge._address_hash(c.recipient))
                                         OR s.user_id = c.user_id
                                      LIMIT 1) s ON true
                  -- consent: a transactional message has no topic
                  LEFT JOIN LATERAL (SELECT CASE WHEN u.topic = 'all' THEN 'unsubscribed from all topics'
                                                 ELSE 'unsubscribed from topic ' || u.topic END AS why
                                       FROM nudge.subscriptions u
                                      WHERE u.user_id = c.user_id AND u.status = 'unsubscribed'
                                        AND u.topic IN (c.topic, 'all') AND NOT c.transactional
                                      ORDER BY u.topic = 'all' DESC
                                      LIMIT 1) u ON true
                 WHERE c.ctid = ANY ($1::tid[])
                   AND (t.name IS NULL OR s.reason IS NOT NULL OR u.why IS NOT NULL)) x
         WHERE o.ctid = x.row_id
        RETURNING o.user_id, o.enrollment_id, o.rule, o.last_error)
    UPDATE nudge.enrollments e
       SET state = CASE WHEN x.rule = 'trigger_dropped' THEN 'cancelled' ELSE 'suppressed' END,
           rule = x.rule, reason = x.last_error || ' (found before the message went out)', updated_at = now()
      FROM x
     WHERE e.user_id = x.user_id AND e.id = x.enrollment_id";

const CLAIM: &str = "
    WITH c AS (
        UPDATE nudge.outbox o
           SET status = 'claimed', attempts = o.attempts + 1, claimed_by = $2,
               available_at = now() + greatest($3, interval '0')
         WHERE o.ctid = ANY ($1::tid[])
        RETURNING o.*)
    SELECT to_jsonb(c) FROM c ORDER BY c.priority DESC, c.id";

/// Claims up to `batch` messages of this node (or server): each an outbox
/// row as JSON (one value per row: a batch of large messages must not meet
/// the size limit of one JSON value).
pub fn claim_here(batch: i32, lease: Interval, consumer: Option<String>) -> Vec<JsonB> {
    let batch = i64::from(batch.max(0));
    let claim = |n: i64| {
        if n > 0 {
            claim_in_group(n, &lease, &consumer)
        } else {
            vec![]
        }
    };
    let Some(groups) = crate::citus::groups_here() else {
        return claim(batch);
    };
    // a node's batch is the best messages of all its groups
    let best: Vec<Vec<Place>> = groups
        .iter()
        .map(|g| crate::citus::within(Some(g.clone()), || peek(batch)))
        .collect();
    groups
        .into_iter()
        .zip(shares(&best, batch as usize))
        .flat_map(|(g, n)| crate::citus::within(Some(g), || claim(n as i64)))
        .collect()
}

fn peek(n: i64) -> Vec<Place> {
    Spi::connect(|c| {
        run(c, PEEK, &[n.into()], "looking at claimable messages")
            .map(|r| Place {
                priority: r.get::<i32>(1).ok().flatten().unwrap_or(0),
                available_at: r
                    .get::<TimestampWithTimeZone>(2)
                    .ok()
                    .flatten()
                    .map(micros)
                    .unwrap_or(0),
                id: r.get::<i64>(3).ok().flatten().unwrap_or(0),
            })
            .collect()
    })
}

fn claim_in_group(n: i64, lease: &Interval, consumer: &Option<String>) -> Vec<JsonB> {
    Spi::connect_mut(|c| {
        let picked: String = run(c, PICK, &[n.into()], "claiming messages")
            .first()
            .get_one::<String>()
            .ok()
            .flatten()
            .unwrap_or_else(|| "{}".into());
        if picked == "{}" {
            return vec![];
        }
        run(
            c,
            CANCEL,
            &[picked.clone().into()],
            "checking messages before they go",
        );
        run(
            c,
            CLAIM,
            &[picked.into(), consumer.clone().into(), (*lease).into()],
            "claiming messages",
        )
        .filter_map(|r| r.get::<JsonB>(1).ok().flatten())
        .collect()
    })
}
