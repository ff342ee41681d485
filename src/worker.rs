//! The background worker: runs the same pass as `nudge.run_due()`, one
//! transaction per batch, until nothing is due, then sleeps on its latch.
//! A commit that opened an enrollment due at once sets that latch.

use crate::privilege::as_extension;
use crate::settings;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::time::Duration;

/// What the worker shares with every backend.
#[derive(Default)]
pub struct Shared {
    /// The worker's PGPROC number (its latch), or -1 while none runs.
    procno: AtomicI32,
    last_pass_us: AtomicI64,
    passes: AtomicI64,
    messages: AtomicI64,
    errors: AtomicI64,
    /// enrollments that failed (with their reason in the enrollment)
    failed: AtomicI64,
    /// enrollments left waiting after a transient failure, to be tried again
    retried: AtomicI64,
}

unsafe impl PGRXSharedMemory for Shared {}

static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"pg_nudge_worker") };

/// Set in the postmaster by _PG_init when preloaded, and so in every backend
/// it forks: only then does the shared memory above exist.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init_preloaded() {
    pg_shmem_init!(
        SHARED = Shared {
            procno: AtomicI32::new(-1),
            ..Default::default()
        }
    );
    PRELOADED.store(true, Ordering::Relaxed);
    BackgroundWorkerBuilder::new("pg_nudge worker")
        .set_type("pg_nudge worker")
        .set_function("nudge_worker_main")
        .set_library("pg_nudge")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

fn shared() -> Option<&'static Shared> {
    PRELOADED.load(Ordering::Relaxed).then(|| SHARED.get())
}

/// Wakes the worker when the current transaction commits (once per transaction).
pub fn wake_on_commit() {
    thread_local! { static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if shared().is_none() || ARMED.with(|a| a.replace(true)) {
        return;
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        ARMED.with(|a| a.set(false));
        wake();
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
        ARMED.with(|a| a.set(false))
    });
}

fn wake() {
    let Some(s) = shared() else { return };
    let procno = s.procno.load(Ordering::Acquire);
    if procno < 0 {
        return;
    }
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

pub struct Status {
    pub running: bool,
    pub last_pass_us: Option<i64>,
    pub passes: i64,
    pub messages: i64,
    pub errors: i64,
    pub failed: i64,
    pub retried: i64,
}

pub fn status() -> Status {
    match shared() {
        None => Status {
            running: false,
            last_pass_us: None,
            passes: 0,
            messages: 0,
            errors: 0,
            failed: 0,
            retried: 0,
        },
        Some(s) => {
            let last = s.last_pass_us.load(Ordering::Relaxed);
            Status {
                running: s.procno.load(Ordering::Relaxed) >= 0,
                last_pass_us: (last != 0).then_some(last),
                passes: s.passes.load(Ordering::Relaxed),
                messages: s.messages.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
                failed: s.failed.load(Ordering::Relaxed),
                retried: s.retried.load(Ordering::Relaxed),
            }
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nudge_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    let s = SHARED.get();
    s.procno
        .store(unsafe { (*pg_sys::MyProc).pgprocno }, Ordering::Release);
    log!("pg_nudge worker started for database {db}");

    let (mut experiments_checked, mut retention_applied, mut wal_checked) = (0, 0, 0);
    loop {
        let present = extension_present();
        let mut wal = false;
        if settings::ENABLED.get() && present {
            match shard_groups(s) {
                // a single server
                Ok(None) => {
                    wal = drain(s);
                    check_experiments(&mut experiments_checked);
                    apply_retention(&mut retention_applied);
                }
                // a Citus node: its own shard groups, one after another (none
                // on a coordinator without shards; docs/citus.md)
                Ok(Some(groups)) => {
                    for g in groups {
                        crate::citus::within(Some(g), || drain_group(s));
                    }
                }
                Err(()) => {}
            }
        }
        check_wal(present, &mut wal_checked);
        // no commit wakes the worker in WAL capture (the inserting statement
        // runs nothing of ours): it looks at the slot often instead
        let mut nap = settings::NAPTIME_MS.get().max(10);
        if wal {
            nap = nap.min(WAL_POLL_MS);
        }
        let nap = Duration::from_millis(nap as u64);
        if stopping() || !BackgroundWorker::wait_latch(Some(nap)) || stopping() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    s.procno.store(-1, Ordering::Release);
    log!("pg_nudge worker stopped");
    // Exit code 1, not 0: a worker that exits 0 is never restarted, and a
    // SIGTERM also comes from DROP DATABASE ... FORCE or pg_terminate_backend,
    // after which the worker must come back. At shutdown nothing restarts anyway.
    unsafe { pg_sys::proc_exit(1) };
}

/// Whether a SIGTERM has come (pg_ctl stop, pg_terminate_backend). Not
/// pgrx's `sigterm_received`, which clears its flag when read: a SIGTERM
/// read between batches would be lost and the worker would never stop.
/// PostgreSQL's own flag, which pgrx's handler sets too, stays set.
fn stopping() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Events queued by deferred capture enrolled per transaction.
const QUEUE_CHUNK: i64 = 100_000;

/// How often the worker reads the slot in WAL capture, at most.
const WAL_POLL_MS: i32 = 100;

/// Inserts read from the WAL slot per transaction (whole transactions).
const WAL_CHUNK: i64 = 50_000;

/// This node's shard groups when our tables are distributed by Citus.
fn shard_groups(s: &Shared) -> Result<Option<Vec<std::rc::Rc<crate::citus::Group>>>, ()> {
    guarded(|| {
        as_extension(|| {
            Spi::connect_mut(|c| match crate::citus::placement(c) {
                crate::citus::Placement::Single => None,
                _ => {
                    // ids of this node's range before anything is written
                    // (a node added after nudge.distribute())
                    if let Err(e) = c.update("SELECT nudge._prepare_node()", None, &[]) {
                        error!("pg_nudge: preparing this node: {e}");
                    }
                    Some(crate::citus::local_groups(c))
                }
            })
        })
    })
    .map_err(|e| {
        s.errors.fetch_add(1, Ordering::Relaxed);
        warning!("pg_nudge worker: reading this node's shards failed, retrying after naptime: {e}");
    })
}

/// Batches until one comes back short: everything due now is written.
/// Returns whether the database captures from the WAL.
fn drain(s: &Shared) -> bool {
    let mut wal = false;
    // captured events first: they may open or close the journeys due now
    loop {
        let pass = guarded(|| {
            as_extension(|| {
                let n = crate::engine::wal::capture_from_wal(WAL_CHUNK);
                (n, crate::engine::wal::mode().is_some())
            })
        });
        match pass {
            Ok((n, _)) if n >= WAL_CHUNK && !stopping() => continue,
            Ok((_, active)) => {
                wal = active;
                break;
            }
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                warning!(
                    "pg_nudge worker: capture from the WAL failed, retrying after naptime: {e}"
                );
                break;
            }
        }
    }
    drain_group(s);
    wal
}

/// Queued events, then due journeys, of one shard group (or the database).
fn drain_group(s: &Shared) {
    loop {
        match guarded(|| as_extension(|| crate::engine::deferred::capture_pending(QUEUE_CHUNK))) {
            Ok(n) if n == QUEUE_CHUNK && !stopping() => continue,
            Ok(_) => break,
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                warning!(
                    "pg_nudge worker: capturing queued events failed, retrying after naptime: {e}"
                );
                break;
            }
        }
    }
    loop {
        let batch = settings::BATCH_SIZE.get().max(1);
        let claimed = match one_batch(batch) {
            Ok(pass) => {
                s.messages.fetch_add(pass.written as i64, Ordering::Relaxed);
                s.failed.fetch_add(pass.failed as i64, Ordering::Relaxed);
                s.retried.fetch_add(pass.retried as i64, Ordering::Relaxed);
                pass.claimed
            }
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                warning!("pg_nudge worker: pass failed, retrying after naptime: {e}");
                0
            }
        };
        s.passes.fetch_add(1, Ordering::Relaxed);
        s.last_pass_us
            .store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
        if claimed < batch as usize || stopping() {
            return;
        }
    }
}

/// One run_due transaction.
fn one_batch(batch: i32) -> Result<crate::engine::run_due::Pass, String> {
    guarded(|| {
        let now = TimestampWithTimeZone::try_from(unsafe { pg_sys::GetCurrentTimestamp() })
            .expect("the clock is in range");
        as_extension(|| crate::engine::run_due::run_due(now, batch))
    })
}

/// Runs `f` in a transaction of its own. An ERROR inside it is caught, the
/// transaction aborted, and the message returned, so that one bad batch never
/// kills the worker (a crash would only be restarted, and fail the same way).
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let f = std::panic::AssertUnwindSafe(f);
    PgTryBuilder::new(move || BackgroundWorker::transaction(move || Ok(f())))
        .catch_others(|e| {
            unsafe {
                pg_sys::AbortCurrentTransaction();
            }
            Err(crate::spi_util::caught_message(e))
        })
        .execute()
}

/// How often the worker looks for experiment winners (`optimize`): the check
/// reads trigger_stats, which is too much for every pass.
const EXPERIMENT_CHECK_US: i64 = 60_000_000;

fn check_experiments(last: &mut i64) {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now - *last < EXPERIMENT_CHECK_US {
        return;
    }
    *last = now;
    match guarded(|| as_extension(|| Spi::connect_mut(crate::experiments::evaluate))) {
        Ok(changes) => {
            for (trigger, winner) in changes {
                log!("pg_nudge worker: trigger {trigger}: new entries now go to variant {winner}");
            }
        }
        Err(e) => warning!("pg_nudge worker: experiment check failed: {e}"),
    }
}

/// How often the worker deletes what is past nudge.retention.
const RETENTION_US: i64 = 3_600_000_000;
/// Rows per table per transaction: short transactions, short locks.
const RETENTION_BATCH: i32 = 5_000;

fn apply_retention(last: &mut i64) {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now - *last < RETENTION_US {
        return;
    }
    *last = now;
    let mut total = 0i64;
    loop {
        let deleted = guarded(|| {
            as_extension(|| {
                Spi::connect(|c| {
                    c.select(
                        "SELECT max(deleted), sum(deleted)::bigint FROM nudge.apply_retention($1)",
                        None,
                        &[RETENTION_BATCH.into()],
                    )
                    .map(|rows| {
                        let r = rows.first();
                        (
                            r.get::<i64>(1).ok().flatten().unwrap_or(0),
                            r.get::<i64>(2).ok().flatten().unwrap_or(0),
                        )
                    })
                })
            })
        })
        .and_then(|r| r.map_err(|e| e.to_string()));
        match deleted {
            Ok((most, sum)) => {
                total += sum;
                if most < RETENTION_BATCH as i64 || stopping() {
                    break;
                }
            }
            Err(e) => {
                warning!("pg_nudge worker: retention failed: {e}");
                break;
            }
        }
    }
    if total > 0 {
        log!("pg_nudge worker: retention deleted {total} rows past nudge.retention");
    }
}

/// How often the worker looks at what WAL capture's slot keeps.
const WAL_CHECK_US: i64 = 60_000_000;
/// WAL kept beyond what capture has read that is worth a warning.
const WAL_WARN_BYTES: i64 = 1 << 30;

/// Warns when WAL capture's slot keeps much WAL; drops the slot of a
/// database whose pg_nudge is gone.
fn check_wal(present: bool, last: &mut i64) {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now - *last < WAL_CHECK_US {
        return;
    }
    *last = now;
    let found = guarded(|| {
        let dropped = if present {
            as_extension(|| crate::engine::wal::drop_orphaned_slot(true))
        } else {
            crate::engine::wal::drop_orphaned_slot(false)
        };
        match dropped {
            Some(slot) => Some(format!(
                "pg_nudge worker: dropped replication slot {slot}: no WAL capture of this database uses it"
            )),
            None if present => as_extension(|| crate::engine::wal::retention_warning(WAL_WARN_BYTES)),
            None => None,
        }
    });
    match found {
        Ok(Some(w)) => warning!("{w}"),
        Ok(None) => {}
        Err(e) => warning!("pg_nudge worker: checking WAL capture's slot failed: {e}"),
    }
}

/// The worker's database may not have the extension (yet).
fn extension_present() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_nudge')",
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}
