//! GUCs. `nudge.database` needs a restart; the rest are read again on SIGHUP.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static USER_SQL_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static DEFERRED_CAPTURE: GucSetting<bool> = GucSetting::<bool>::new(false);
// Read by nudge.fail (sql/outbox.sql); defined here so that they are real
// settings with limits, not placeholders.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
static RETRY_BASE_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(30);
static RETRY_MAX_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(3600);
// Read by nudge.apply_retention (an interval, or 'off').
static RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"180 days"));

/// `preloaded`: called from shared_preload_libraries. Only then may a
/// postmaster-level setting be defined (later it is a FATAL error), and only
/// then is there a worker to read it.
pub fn define(preloaded: bool) {
    if preloaded {
        GucRegistry::define_string_guc(
            c"nudge.database",
            c"Database the pg_nudge background worker serves.",
            c"The worker runs nudge.run_due there; the extension must be created in it.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"nudge.naptime",
        c"Milliseconds the worker sleeps when nothing is due.",
        c"A capture that opens an enrollment due at once wakes it early.",
        &NAPTIME_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"nudge.batch_size",
        c"Due enrollments the worker takes per transaction.",
        c"",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"nudge.enabled",
        c"Whether the pg_nudge worker evaluates triggers.",
        c"Off: the worker idles; nudge.run_due() still works by hand.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"nudge.deferred_capture",
        c"Queue captured events for the worker instead of enrolling them in the inserting statement.",
        c"On: an insert only appends its watched events to nudge.capture_queue (same transaction); \
the worker, nudge.capture_pending() or nudge.run_due() enrolls them, in event time, moments later.",
        &DEFERRED_CAPTURE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nudge.user_sql_timeout",
        c"Longest a batch's audience or context query may run.",
        c"0: no limit. A query cancelled by it leaves the messages of the users it was for waiting, tried again with backoff (nudge.retry_base_seconds, nudge.max_attempts).",
        &USER_SQL_TIMEOUT_MS,
        0,
        3_600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"nudge.max_attempts",
        c"Delivery attempts before a message is dead.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nudge.retry_base_seconds",
        c"First retry delay of a failed message; it doubles with each attempt.",
        c"",
        &RETRY_BASE_SECONDS,
        0,
        86_400,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nudge.retry_max_seconds",
        c"Longest retry delay of a failed message.",
        c"",
        &RETRY_MAX_SECONDS,
        0,
        604_800,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"nudge.retention",
        c"How long finished journeys, journal lines and sent messages are kept ('off': forever).",
        c"An interval such as '180 days'; suppressions and events are always kept.",
        &RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The retry rule of failed deliveries (`nudge.fail`), also applied to
/// enrollments whose lookups failed in a way that may pass.
pub fn backoff() -> nudge_core::retry::Backoff {
    nudge_core::retry::Backoff {
        base_seconds: RETRY_BASE_SECONDS.get() as f64,
        max_seconds: RETRY_MAX_SECONDS.get() as f64,
        max_attempts: MAX_ATTEMPTS.get(),
    }
}

/// How long a pass may spend finding whose lookup failed in a batch.
pub fn user_sql_budget() -> std::time::Duration {
    let ms = USER_SQL_TIMEOUT_MS.get();
    let ms = if ms > 0 { 2 * ms as u64 } else { 10_000 };
    std::time::Duration::from_millis(ms)
}

pub fn database() -> String {
    DATABASE
        .get()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| "postgres".into())
}
