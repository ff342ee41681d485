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

/// nudge.capture_queue, open for appending in the current transaction.
pub struct Queue {
    rel: pg_sys::Relation,
    queued_at: pg_sys::Datum,
    empty: pg_sys::Datum,
    rows: usize,
}

impl Queue {
    pub unsafe fn open() -> Queue {
        // on a Citus node, the queue's shard of the current group (src/citus.rs)
        let name = crate::citus::current()
            .and_then(|g| {
                g.table("nudge.capture_queue")
                    .map(|t| t.trim_start_matches("nudge.").to_owned())
            })
            .unwrap_or_else(|| "capture_queue".into());
        let name = std::ffi::CString::new(name).expect("a table name has no NUL");
        let rv = pg_sys::makeRangeVar(c"nudge".as_ptr() as *mut _, name.as_ptr() as *mut _, -1);
        let relid = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
            0,
            None,
            std::ptr::null_mut(),
        );
        Queue {
            rel: pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE),
            queued_at: pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp()),
            // made here, in the statement's memory: rows are read in a
            // context of their own that is reset row by row
            empty: jsonb_in("{}"),
            rows: 0,
        }
    }

    pub unsafe fn empty_props(&mut self) -> pg_sys::Datum {
        self.empty
    }

    pub unsafe fn push(
        &mut self,
        user: &str,
        event: &str,
        at: TimestampWithTimeZone,
        props: pg_sys::Datum,
    ) {
        let mut values = [
            user.into_datum().expect("text"),
            event.into_datum().expect("text"),
            at.into_datum().expect("timestamptz"),
            props,
            self.queued_at,
        ];
        let mut nulls = [false; 5];
        let tuple =
            pg_sys::heap_form_tuple((*self.rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(self.rel, tuple);
        pg_sys::heap_freetuple(tuple);
        self.rows += 1;
    }

    /// Closes the table; a commit that queued anything wakes the worker.
    pub unsafe fn close(self) {
        pg_sys::table_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if self.rows > 0 {
            crate::worker::wake_on_commit();
        }
    }
}

/// JSON text as a jsonb datum, through jsonb's own input function (an ERROR
/// when it is not JSON).
pub unsafe fn jsonb_in(text: &str) -> pg_sys::Datum {
    let Ok(c) = std::ffi::CString::new(text) else {
        error!("props are not JSON (a NUL character)");
    };
    pg_sys::OidInputFunctionCall(
        pg_sys::Oid::from(pg_sys::F_JSONB_IN),
        c.as_ptr() as *mut _,
        pg_sys::JSONBOID,
        -1,
    )
}

/// Queued events taken and enrolled at a time: memory stays bounded however
/// many a call is asked to take.
const CHUNK: i64 = 100_000;
const MAX_PARTS: i64 = 32;

/// Enrolls up to `max` queued events (any order: capture sorts each user's
/// events by time) and removes them from the queue. Returns how many.
///
/// A queue longer than a chunk is taken in parts by a hash of the user id,
/// so that each user's events are enrolled together, once: capture reads a
/// user's journeys and history for every batch the user is in, and chunks
/// cut in queue order put the busiest users in all of them (1,000,000
/// queued events went at a tenth of the speed of one batch).
pub fn capture_pending(max: i64) -> i64 {
    let queued = Spi::connect(|c| {
        run(
            c,
            "SELECT count(*) FROM (SELECT 1 FROM nudge.capture_queue LIMIT $1) q",
            &[max.max(0).into()],
            "counting queued events",
        )
        .first()
        .get_one::<i64>()
        .ok()
        .flatten()
        .unwrap_or(0)
    });
    // each part scans the whole queue: at most MAX_PARTS scans, so a queue
    // of ten million is taken in parts larger than a chunk
    let parts = ((queued + CHUNK - 1) / CHUNK).clamp(1, MAX_PARTS);
    let mut taken = 0;
    for part in 0..parts {
        if taken >= max {
            break;
        }
        // a part may hold more than a chunk (a hash is not exact): take it all
        let n = capture_chunk(parts, part, max - taken);
        taken += n;
    }
    taken
}

fn capture_chunk(parts: i64, part: i64, max: i64) -> i64 {
    let batch = Spi::connect_mut(|c| {
        let rows = run(
            c,
            "DELETE FROM nudge.capture_queue
              WHERE ctid = ANY (ARRAY(SELECT ctid FROM nudge.capture_queue
                                       WHERE (pg_catalog.hashtext(user_id) & 2147483647) % $2 = $3
                                       LIMIT $1 FOR UPDATE SKIP LOCKED))
             RETURNING user_id, event, occurred_at, props",
            &[max.max(0).into(), parts.into(), part.into()],
            "taking queued events",
        );
        let mut b = Batch::default();
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
