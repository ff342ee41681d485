//! WAL capture (`nudge.set_capture('wal')`): the sources' statement triggers
//! are disabled, so an inserting statement runs nothing of ours; the worker
//! (or `capture_pending`, or `run_due`) reads the inserts back from a logical
//! replication slot with our output plugin (`plugin`) and enrolls them with
//! the same `capture` as the other modes.
//!
//! Nothing lost, nothing twice: a pass peeks (the slot does not move),
//! enrolls, and records in `nudge.wal_capture.position`, in the same
//! transaction, where it got to. Only a later transaction moves the slot up
//! to a recorded position, and the plugin skips what is before it, so a pass
//! that crashes after its commit repeats nothing. docs/operations.md, "WAL
//! capture", is the user's account of it.

mod plugin;

use crate::engine::capture::{capture, Batch};
use crate::spi_util::{or_raise, ts};
use nudge_core::wal::{next_position, Line, Lsn, PluginOptions, Position, SourceOption};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

/// Inserts enrolled per call of `capture` (the slot's answer is read in
/// chunks of this many lines).
const CHUNK: i64 = 20_000;

/// Serializes passes over the slot (a slot is read by one backend at a
/// time): a transaction-level advisory lock, which takes no transaction id.
const LOCK_KEY: i64 = 0x6e75_6467_655f_7761; // "nudge_wa"

struct State {
    slot: String,
    wal_from: Lsn,
    until: Option<Lsn>,
    position: Lsn,
}

fn lsn(s: Option<String>) -> Lsn {
    s.as_deref().and_then(Lsn::parse).unwrap_or_default()
}

/// The state as the last pass committed it. Read with the latest snapshot,
/// not the statement's: a pass that waited for the lock must see where the
/// pass it waited for got to (a repeatable-read transaction that then writes
/// the row fails to serialize instead of enrolling twice).
fn state(c: &SpiClient<'_>) -> Option<State> {
    // a library newer than the database's SQL (before ALTER EXTENSION UPDATE)
    text(
        c,
        "SELECT pg_catalog.to_regclass('nudge.wal_capture')::text",
        &[],
        "finding the WAL capture state",
    )?;
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let rows = c.select(
        "SELECT slot::text, wal_from::text, until::text, position::text FROM nudge.wal_capture",
        None,
        &[],
    );
    unsafe { pg_sys::PopActiveSnapshot() };
    let rows = or_raise(rows, "reading the WAL capture state");
    let r = rows.into_iter().next()?;
    Some(State {
        slot: r.get::<String>(1).ok().flatten()?,
        wal_from: lsn(r.get(2).ok().flatten()),
        until: r
            .get::<String>(3)
            .ok()
            .flatten()
            .and_then(|s| Lsn::parse(&s)),
        position: lsn(r.get(4).ok().flatten()),
    })
}

/// The database's slot: one per database, as slots are the server's.
fn slot_name() -> String {
    format!("pg_nudge_{}", unsafe { pg_sys::MyDatabaseId }.to_u32())
}

/// Whether this transaction has written nothing yet: a replication slot can
/// only be created then, and only then is every position read here one that
/// another, committed transaction wrote.
fn fresh_transaction() -> bool {
    unsafe { pg_sys::GetTopTransactionIdIfAny() == pg_sys::InvalidTransactionId }
}

fn exec(c: &mut SpiClient<'_>, sql: &str, args: &[pgrx::datum::DatumWithOid<'_>], doing: &str) {
    or_raise(c.update(sql, None, args), doing);
}

/// The first column of a SELECT's first row. Read-only SPI: pgrx gives a
/// read-write statement a transaction id, and a transaction that has one can
/// no longer create a replication slot.
fn text(
    c: &SpiClient<'_>,
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    doing: &str,
) -> Option<String> {
    let rows = or_raise(c.select(sql, None, args), doing);
    if rows.is_empty() {
        return None;
    }
    rows.first().get::<String>(1).ok().flatten()
}

pub fn lock(c: &SpiClient<'_>) {
    text(
        c,
        "SELECT pg_catalog.pg_advisory_xact_lock($1)::text",
        &[LOCK_KEY.into()],
        "locking WAL capture",
    );
}

/// Switches the sources' statement triggers on or off, and returns the
/// position that separates their inserts from the slot's: ALTER TABLE waits
/// for every transaction inserting into the table, and holds back new ones
/// until this one commits, so what committed before the position was (or is
/// again) the triggers', and what commits after it is not.
fn switch_triggers(c: &mut SpiClient<'_>, enable: bool) -> Lsn {
    let tables: Vec<String> = or_raise(
        c.select(
            "SELECT source::text FROM nudge.sources ORDER BY source::oid",
            None,
            &[],
        ),
        "reading the sources",
    )
    .into_iter()
    .filter_map(|r| r.get::<String>(1).ok().flatten())
    .collect();
    let verb = if enable { "ENABLE" } else { "DISABLE" };
    // Locking the sources one after the other can deadlock with an
    // application transaction that inserts into two of them in the other
    // order. Whichever waits deadlock_timeout first gives up: make it us.
    exec(
        c,
        "SET LOCAL deadlock_timeout = '20ms'",
        &[],
        "setting deadlock_timeout",
    );
    for t in tables {
        exec(
            c,
            &format!("ALTER TABLE {t} {verb} TRIGGER nudge_capture"),
            &[],
            "switching a source's capture trigger",
        );
    }
    lsn(text(
        c,
        "SELECT pg_catalog.pg_current_wal_insert_lsn()::text",
        &[],
        "reading the WAL position",
    ))
}

/// Creates the slot anew and moves capture onto it. Must run before the
/// transaction writes anything (PostgreSQL creates slots only then).
fn start(c: &mut SpiClient<'_>) -> Lsn {
    let slot = slot_name();
    text(
        c,
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name)::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
        &[slot.clone().into()],
        "dropping an old slot",
    );
    let created = lsn(text(
        c,
        "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pg_nudge')",
        &[slot.clone().into()],
        "creating the replication slot",
    ));
    let wal_from = switch_triggers(c, false);
    exec(
        c,
        "INSERT INTO nudge.wal_capture (slot, wal_from, position)
         VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn)
         ON CONFLICT (one) DO UPDATE SET slot = excluded.slot, wal_from = excluded.wal_from, until = NULL,
                position = excluded.position, caught_up_at = NULL, since = now()",
        &[slot.into(), wal_from.to_string().into(), created.to_string().into()],
        "recording WAL capture",
    );
    // positions of an earlier slot (or another server's, restored) mean
    // nothing in this one; wal_from covers what they did
    exec(
        c,
        "UPDATE nudge.sources SET wal_from = NULL WHERE wal_from IS NOT NULL",
        &[],
        "resetting the sources",
    );
    wal_from
}

/// `set_capture('wal')`.
pub fn enter() -> String {
    if !fresh_transaction() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "set_capture('wal') must come before anything this transaction writes",
            "PostgreSQL creates a replication slot only in a transaction that has written nothing: call it in a transaction of its own"
        );
    }
    Spi::connect_mut(|c| {
        let level = text(
            c,
            "SELECT pg_catalog.current_setting('wal_level')",
            &[],
            "reading wal_level",
        );
        if level.as_deref() != Some("logical") {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("set_capture('wal') needs wal_level = logical (it is {})", level.unwrap_or_default()),
                "set wal_level = logical in postgresql.conf and restart the server; docs/operations.md, \"WAL capture\""
            );
        }
        if let Some(allowed) = plugin_refused(c) {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("set_capture('wal') needs the server to allow pg_nudge as a logical decoding output plugin (output_plugin_libraries is '{allowed}')"),
                "add pg_nudge to output_plugin_libraries in postgresql.conf and reload the server; docs/operations.md, \"WAL capture\""
            );
        }
        lock(c);
        if let Some(t) = text(
            c,
            "SELECT string_agg(source::text, ', ') FROM nudge.sources s JOIN pg_catalog.pg_class r ON r.oid = s.source
              WHERE r.relpersistence = 'u'",
            &[],
            "reading the sources",
        ) {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("set_capture('wal'): {t} is unlogged, and an unlogged table writes nothing to the WAL"),
                "ALTER TABLE ... SET LOGGED, or nudge.drop_source it first"
            );
        }
        match state(c) {
            Some(s) if s.until.is_none() => {
                format!("already capturing from the WAL (slot {})", s.slot)
            }
            Some(s) => {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                    format!(
                        "capture is still leaving WAL mode: slot {} has inserts up to {} to enroll",
                        s.slot,
                        s.until.unwrap_or_default()
                    ),
                    "run SELECT nudge.capture_pending(); (or let the worker run) and try again"
                );
            }
            None => {
                let from = start(c);
                format!(
                    "capturing from the WAL (slot {}) for inserts committed from {from} on",
                    slot_name()
                )
            }
        }
    })
}

/// The server's list of allowed output plugins, when it has one (some builds
/// of PostgreSQL do) and pg_nudge is not on it.
fn plugin_refused(c: &mut SpiClient<'_>) -> Option<String> {
    let allowed = text(
        c,
        "SELECT pg_catalog.current_setting('output_plugin_libraries', true)",
        &[],
        "reading output_plugin_libraries",
    )?;
    let listed = allowed
        .split(',')
        .any(|l| l.trim().trim_matches('"') == "pg_nudge");
    (!listed).then_some(allowed)
}

/// `set_capture('immediate' | 'deferred')` while in WAL mode: the triggers
/// capture again; the slot is read up to the switch, then dropped.
pub fn leave() -> Option<String> {
    Spi::connect_mut(|c| {
        lock(c);
        let s = state(c)?;
        if s.until.is_some() {
            return Some(format!("leaving WAL mode already (slot {})", s.slot));
        }
        let until = switch_triggers(c, true);
        exec(
            c,
            "UPDATE nudge.wal_capture SET until = $1::text::pg_lsn",
            &[until.to_string().into()],
            "recording the switch",
        );
        Some(format!(
            "the triggers capture again; slot {} is read up to {until}, then dropped",
            s.slot
        ))
    })
}

/// Whether the database is in WAL capture, or leaving it.
pub fn mode() -> Option<&'static str> {
    Spi::connect(|c| {
        state(c).map(|s| {
            if s.until.is_some() {
                "leaving wal"
            } else {
                "wal"
            }
        })
    })
}

/// Enrolls what the slot holds, up to about `max` inserts (whole
/// transactions). Returns how many it took; 0 when not in WAL mode.
pub fn capture_from_wal(max: i64) -> i64 {
    let fresh = fresh_transaction();
    let max = max.clamp(1, i32::MAX as i64);
    let Some((taken, upto, last_end, rows)) = Spi::connect_mut(|c| {
        lock(c);
        let s = state(c)?;
        // a restored dump names the slot of the database it was taken from
        let slot = (s.slot == slot_name())
            .then(|| {
                or_raise(
                    c.select(
                        "SELECT wal_status, confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots
                          WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                        None,
                        &[s.slot.clone().into()],
                    ),
                    "reading the replication slot",
                )
                .into_iter()
                .next()
                .map(|r| (r.get::<String>(1).ok().flatten(), lsn(r.get(2).ok().flatten())))
            })
            .flatten();
        let usable = matches!(&slot, Some((status, _)) if status.as_deref() != Some("lost"));
        if !usable {
            recover(c, &s, slot.is_some(), fresh);
            return None;
        }
        if fresh && s.until.is_some_and(|u| s.position >= u) {
            // every insert before the switch back is enrolled, and that is
            // committed: only now may the slot go (dropping it is not undone
            // by a rollback)
            exec(
                c,
                "DELETE FROM nudge.wal_capture",
                &[],
                "ending WAL capture",
            );
            text(
                c,
                "SELECT pg_catalog.pg_drop_replication_slot($1)::text",
                &[s.slot.clone().into()],
                "dropping the replication slot",
            );
            return None;
        }
        let confirmed = slot.map(|(_, l)| l).unwrap_or_default();
        if fresh && confirmed < s.position {
            // what the last pass enrolled is committed: the server may let its WAL go
            exec(
                c,
                "SELECT pg_catalog.pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[s.slot.clone().into(), s.position.to_string().into()],
                "moving the replication slot up",
            );
        }
        let flushed = lsn(text(
            c,
            "SELECT pg_catalog.pg_current_wal_flush_lsn()::text",
            &[],
            "reading the WAL position",
        ));
        let upto = s.until.map_or(flushed, |u| u.min(flushed));
        let options = pass_options(c, &s);
        // read through a cursor and enrolled a chunk at a time: one
        // transaction of millions of inserts is taken whole (a pass never
        // stops inside a transaction), but never held in memory whole
        let mut cursor = c.open_cursor(
            // by user: a user's inserts are enrolled in one chunk (capture
            // reads each user's journeys and history once per chunk)
            "SELECT data FROM pg_catalog.pg_logical_slot_peek_changes($1, $2::text::pg_lsn, $3, 'pass', $4)
              ORDER BY (data::pg_catalog.json ->> 'u')",
            &[s.slot.clone().into(), upto.to_string().into(), (max as i32).into(), options.into()],
        );
        let mut batch = Batch::default();
        let (mut rows, mut last_end, mut unreadable, mut taken) = (0usize, None, 0usize, 0i64);
        loop {
            let lines = or_raise(cursor.fetch(CHUNK), "reading the replication slot");
            // pgrx frees a cursor's chunks only when the SPI connection ends
            let chunk = unsafe { pg_sys::SPI_tuptable };
            if lines.is_empty() {
                break;
            }
            for r in lines {
                rows += 1;
                let Some(data) = r.get::<String>(1).ok().flatten() else {
                    continue;
                };
                // where the line's transaction ends is read on its own, so
                // that a line read no further still moves the position
                if let Ok(p) = serde_json::from_str::<Position>(&data) {
                    last_end = last_end.max(Some(Lsn(p.x)));
                }
                match serde_json::from_str::<Line>(&data) {
                    Ok(Line::Captured(e)) => {
                        // a full chunk goes at the next user
                        if batch.users.len() >= CHUNK as usize
                            && batch
                                .users
                                .last()
                                .is_some_and(|u| u.as_deref() != Some(e.u.as_str()))
                        {
                            taken += batch.users.len() as i64;
                            capture(std::mem::take(&mut batch));
                        }
                        batch.users.push(Some(e.u));
                        batch.events.push(Some(e.e));
                        batch.times.push(Some(ts(e.t)));
                        batch.props.push(Some(JsonB(e.p)));
                    }
                    Ok(Line::Unreadable(u)) => {
                        unreadable += 1;
                        if unreadable <= 10 {
                            warning!(
                                "pg_nudge: WAL capture skipped an insert committed at {}: {}",
                                Lsn(u.c),
                                u.bad
                            );
                        }
                    }
                    Err(e) => warning!(
                        "pg_nudge: WAL capture skipped a line it cannot read ({e}): {data:.200}"
                    ),
                }
            }
            unsafe { pg_sys::SPI_freetuptable(chunk) };
        }
        taken += batch.users.len() as i64;
        if !batch.users.is_empty() {
            capture(batch);
        }
        Some((taken, upto, last_end, rows))
    }) else {
        return 0;
    };
    // Decoding restarts from the slot's restart point, which moves only at a
    // record of the running transactions; the server writes one every 15 s,
    // and every pass until the next would decode those 15 s again (at 5,000
    // inserts a second that was most of a pass). One now lets the next pass
    // move it up to here.
    if rows > 0 {
        unsafe { pg_sys::LogStandbySnapshot() };
    }
    let position = next_position(rows, max as usize, last_end, upto);
    let caught_up = rows < max as usize;
    Spi::connect_mut(|c| {
        exec(
            c,
            "UPDATE nudge.wal_capture SET position = $1::text::pg_lsn,
                    caught_up_at = CASE WHEN $2 THEN now() ELSE caught_up_at END",
            &[position.to_string().into(), caught_up.into()],
            "recording what WAL capture enrolled",
        );
    });
    taken
}

/// The slot is gone (dropped by hand, or never made on this server: a
/// restored dump) or lost (it held more WAL than max_slot_wal_keep_size).
/// Inserts it did not keep cannot be read again: say so, and start anew.
fn recover(c: &mut SpiClient<'_>, s: &State, exists: bool, fresh: bool) {
    let what = if exists {
        "was invalidated (max_slot_wal_keep_size)"
    } else {
        "is missing"
    };
    if s.until.is_some() {
        warning!("pg_nudge: WAL capture's slot {} {what}; inserts committed before {} that it had not given yet are not enrolled", s.slot, s.until.unwrap_or_default());
        exec(
            c,
            "DELETE FROM nudge.wal_capture",
            &[],
            "ending WAL capture",
        );
        if exists {
            text(
                c,
                "SELECT pg_catalog.pg_drop_replication_slot($1)::text",
                &[s.slot.clone().into()],
                "dropping the replication slot",
            );
        }
        return;
    }
    if !fresh {
        // a slot is created only before a transaction writes: the next pass does it
        return;
    }
    let from = start(c);
    warning!(
        "pg_nudge: WAL capture's slot {} {what}; a new slot {} captures inserts committed from {from} on, and inserts committed after {} and before it are not enrolled",
        s.slot,
        slot_name(),
        s.position
    );
}

/// The plugin's options for this pass: the sources, the watched events and
/// the window of commits to take (`nudge_core::wal::PluginOptions`).
fn pass_options(c: &SpiClient<'_>, s: &State) -> String {
    let mut o = PluginOptions {
        from: s.position.0,
        wal_from: s.wal_from.0,
        until: s.until.map(|u| u.0),
        ..Default::default()
    };
    // Read after `upto`, with the latest snapshot and the definitions as
    // they are now: a source or a trigger that committed before an insert
    // the pass takes is known to it. An insert into a partitioned source is
    // decoded as its leaf partition's: every leaf maps to its source.
    unsafe {
        pg_sys::AcceptInvalidationMessages();
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
    }
    let rows = c.select(
        "SELECT coalesce(p.relid, s.source)::oid, s.user_column, coalesce(s.event_column, ''),
                coalesce(s.time_column, ''), coalesce(s.props_column, ''), coalesce(s.event_name, ''),
                s.wal_from::text
           FROM nudge.sources s
           LEFT JOIN LATERAL pg_catalog.pg_partition_tree(s.source) p ON p.isleaf",
        None,
        &[],
    );
    let watched: Vec<String> = crate::catalog::live_triggers(c)
        .watched
        .iter()
        .cloned()
        .collect();
    unsafe { pg_sys::PopActiveSnapshot() };
    for r in or_raise(rows, "reading the sources") {
        let Some(oid) = r.get::<pg_sys::Oid>(1).ok().flatten() else {
            continue;
        };
        let args = (2..=6)
            .map(|i| r.get::<String>(i).ok().flatten().unwrap_or_default())
            .collect();
        o.sources.insert(
            oid.to_u32(),
            SourceOption {
                args,
                from: lsn(r.get(7).ok().flatten()).0,
            },
        );
    }
    o.watched = watched;
    serde_json::to_string(&o).expect("JSON")
}

/// WAL capture's state for worker_status: the mode, the WAL not yet
/// enrolled (bytes) and since when the slot has not been read to its end.
pub fn lag() -> Option<(String, Option<i64>, Option<pgrx::datum::Interval>)> {
    Spi::connect(|c| {
        state(c)?;
        let rows = or_raise(
            c.select(
                "SELECT CASE WHEN until IS NULL THEN 'wal' ELSE 'leaving wal' END,
                        CASE WHEN NOT pg_catalog.pg_is_in_recovery()
                             THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), position)::bigint END,
                        now() - coalesce(caught_up_at, since)
                   FROM nudge.wal_capture",
                None,
                &[],
            ),
            "reading the WAL capture state",
        );
        let r = rows.into_iter().next()?;
        Some((
            r.get::<String>(1).ok().flatten().unwrap_or_default(),
            r.get::<i64>(2).ok().flatten(),
            r.get::<pgrx::datum::Interval>(3).ok().flatten(),
        ))
    })
}

/// WAL the slot keeps on disk beyond what capture has read, when that is
/// more than `limit` bytes or the server may soon invalidate the slot: the
/// worker warns, as a stopped or failing capture would otherwise fill the
/// disk (or lose the slot) silently.
pub fn retention_warning(limit: i64) -> Option<String> {
    Spi::connect(|c| {
        state(c)?;
        let rows = or_raise(
            c.select(
                "SELECT s.slot_name::text, pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint, s.wal_status
                   FROM nudge.wal_capture w JOIN pg_catalog.pg_replication_slots s ON s.slot_name = w.slot",
                None,
                &[],
            ),
            "reading the replication slot",
        );
        let r = rows.into_iter().next()?;
        let slot = r.get::<String>(1).ok().flatten()?;
        let kept = r.get::<i64>(2).ok().flatten().unwrap_or(0);
        let status = r.get::<String>(3).ok().flatten().unwrap_or_default();
        (kept > limit || status == "unreserved").then(|| {
            format!("pg_nudge: WAL capture's slot {slot} keeps {} MB of WAL (wal_status {status}); capture is behind or stopped (nudge.worker_status(), docs/operations.md \"WAL capture\")", kept / (1024 * 1024))
        })
    })
}

/// A slot of this database's name that no WAL capture owns: left by a
/// `set_capture('wal')` that rolled back after making it, or by pg_nudge
/// dropped (DROP EXTENSION). It would keep WAL forever: the worker drops it.
pub fn drop_orphaned_slot(present: bool) -> Option<String> {
    let slot = slot_name();
    Spi::connect(|c| {
        if present {
            // set_capture('wal') makes its slot under the lock
            lock(c);
            if state(c).is_some() {
                return None;
            }
        }
        let dropped = text(
            c,
            "WITH d AS (SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots
                         WHERE slot_name = $1 AND database = pg_catalog.current_database() AND NOT active)
             SELECT count(*)::text FROM d",
            &[slot.clone().into()],
            "dropping the replication slot",
        );
        (dropped.as_deref() != Some("0")).then_some(slot)
    })
}
