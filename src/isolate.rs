//! Running SQL that users wrote (the profile query now; audience and context
//! queries next) so that one user's failure fails only that user's message.
//!
//! The batch runs as one statement inside a subtransaction; only if it fails
//! is it run again one user at a time, each in a subtransaction of its own,
//! to find whose lookup fails. The common case stays one statement per batch.

use pgrx::prelude::*;
use std::collections::HashMap;

/// Why a user's lookup failed, and whether trying again later may succeed
/// (the timeout we armed, a lock or deadlock, the server short of memory or
/// disk): such a failure leaves the enrollment waiting, to be retried.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub message: String,
    pub transient: bool,
}

impl Failure {
    pub fn permanent(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            transient: false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `f` in a subtransaction, the way a plpgsql EXCEPTION block does: an
/// ERROR rolls back what `f` did and comes back as `Err(message)`. A cancel
/// of the caller's statement (pg_cancel_backend, a client's ^C) is not one
/// user's failure: it is raised again, and the caller's statement ends.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    let result: Result<R, (Failure, bool)> = unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        // allocate in the caller's context, so that results outlive the subtransaction
        pg_sys::MemoryContextSwitchTo(context);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
            .catch_others(|e| {
                let cancelled = is_cancel(&e);
                let transient = is_transient(&e);
                let message = crate::spi_util::caught_message(e);
                Err((Failure { message, transient }, cancelled))
            })
            .execute();
        match result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    };
    match result {
        Err((failure, true)) => {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                failure.message
            );
        }
        other => other.map_err(|(failure, _)| failure),
    }
}

/// A query cancel that came from outside (57014, but not the statement
/// timeout that `user_sql` arms around a definer's query, which fails only
/// the users it was for).
fn is_cancel(e: &pg_sys::panic::CaughtError) -> bool {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r) => {
            r.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
                && !r.message().contains("statement timeout")
        }
        pg_sys::panic::CaughtError::RustPanic { .. } => false,
    }
}

/// Errors that may not happen again: our statement timeout, lock and
/// serialization conflicts, and a server short of resources (class 53).
fn is_transient(e: &pg_sys::panic::CaughtError) -> bool {
    use PgSqlErrorCode::*;
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r) => {
            matches!(
                r.sql_error_code(),
                ERRCODE_QUERY_CANCELED
                    | ERRCODE_LOCK_NOT_AVAILABLE
                    | ERRCODE_T_R_SERIALIZATION_FAILURE
                    | ERRCODE_T_R_DEADLOCK_DETECTED
                    | ERRCODE_INSUFFICIENT_RESOURCES
                    | ERRCODE_DISK_FULL
                    | ERRCODE_OUT_OF_MEMORY
                    | ERRCODE_TOO_MANY_CONNECTIONS
            )
        }
        pg_sys::panic::CaughtError::RustPanic { .. } => false,
    }
}

/// Looks up `users` with `lookup` (one statement for a whole slice of users).
/// Users missing from a successful lookup are absent from the result; users
/// whose lookup fails map to `Err(failure)`. When the batch fails, the users
/// are looked up one at a time to find whose lookup fails, for at most
/// `budget`: past it, the users not yet looked up get a transient failure
/// (tried again in a later pass) instead of stalling this one for
/// batch x timeout behind a slow query.
pub fn per_user<T>(
    users: &[String],
    budget: std::time::Duration,
    lookup: impl Fn(&[String]) -> HashMap<String, T>,
) -> HashMap<String, Result<T, Failure>> {
    match subtransaction(|| lookup(users)) {
        Ok(found) => found.into_iter().map(|(u, v)| (u, Ok(v))).collect(),
        Err(f) if users.len() == 1 => [(users[0].clone(), Err(f))].into(),
        Err(batch) => {
            let started = std::time::Instant::now();
            let mut out = HashMap::new();
            for u in users {
                if started.elapsed() > budget {
                    let why = Failure {
                        message: format!("not looked up: the batch's lookup failed ({batch}) and finding whose lookup fails took too long"),
                        transient: true,
                    };
                    out.insert(u.clone(), Err(why));
                    continue;
                }
                match subtransaction(|| lookup(std::slice::from_ref(u))) {
                    Ok(found) => out.extend(found.into_iter().map(|(u, v)| (u, Ok(v)))),
                    Err(e) => {
                        out.insert(u.clone(), Err(e));
                    }
                }
            }
            out
        }
    }
}
