//! Deferred capture (`nudge.deferred_capture = on`): the inserting statement
//! only appends its watched events to `nudge.capture_queue`, with plain heap
//! inserts (no SQL, no index); the worker, `nudge.capture_pending()` or
//! `nudge.run_due()` takes them off in large batches and runs the very same
//! capture on them. Event time makes the result the one immediate capture
//! gives (the engine test loads a month both ways); the queue rows are
//! written in the inserting transaction, so a rollback takes them back too.

use crate::engine::capture::{capture, Batch};
use crate::spi_util::run;
use pgrx::prelude::*;
use pgrx::JsonB;

/// Appends the batch to nudge.capture_queue in the current transaction.
pub unsafe fn enqueue(batch: Batch) {
    let rv = pg_sys::makeRangeVar(
        c"nudge".as_ptr() as *mut _,
        c"capture_queue".as_ptr() as *mut _,
        -1,
    );
    let relid = pg_sys::RangeVarGetRelidExtended(
        rv,
        pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        0,
        None,
        std::ptr::null_mut(),
    );
    let rel = pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
    let desc = (*rel).rd_att;
    let queued_at = pg_sys::GetCurrentTransactionStartTimestamp();
    for i in 0..batch.users.len() {
        let (Some(Some(user)), Some(Some(event)), Some(Some(at))) =
            (batch.users.get(i), batch.events.get(i), batch.times.get(i))
        else {
            continue;
        };
        let props = batch.props[i]
            .as_ref()
            .map_or(JsonB(serde_json::json!({})), |p| JsonB(p.0.clone()));
        let mut values = [
            user.as_str().into_datum().expect("text"),
            event.as_str().into_datum().expect("text"),
            at.into_datum().expect("timestamptz"),
            props.into_datum().expect("jsonb"),
            pg_sys::Datum::from(queued_at),
        ];
        let mut nulls = [false; 5];
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        pg_sys::heap_freetuple(tuple);
    }
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    crate::worker::wake_on_commit();
}

/// Enrolls up to `max` queued events (any order: capture sorts each user's
/// events by time) and removes them from the queue. Returns how many.
pub fn capture_pending(max: i64) -> i64 {
    let batch = Spi::connect_mut(|c| {
        let rows = run(
            c,
            "DELETE FROM nudge.capture_queue
              WHERE ctid = ANY (ARRAY(SELECT ctid FROM nudge.capture_queue LIMIT $1 FOR UPDATE SKIP LOCKED))
             RETURNING user_id, event, occurred_at, props",
            &[max.max(0).into()],
            "taking queued events",
        );
        let mut b = Batch {
            users: vec![],
            events: vec![],
            times: vec![],
            props: vec![],
        };
        for r in rows {
            b.users.push(r.get::<String>(1).ok().flatten());
            b.events.push(r.get::<String>(2).ok().flatten());
            b.times
                .push(r.get::<TimestampWithTimeZone>(3).ok().flatten());
            b.props.push(r.get::<JsonB>(4).ok().flatten());
        }
        b
    });
    let n = batch.users.len() as i64;
    if n > 0 {
        capture(batch);
    }
    n
}
