//! Running SQL that users wrote (the profile query now; audience and context
//! queries next) so that one user's failure fails only that user's message.
//!
//! The batch runs as one statement inside a subtransaction; only if it fails
//! is it run again one user at a time, each in a subtransaction of its own,
//! to find whose lookup fails. The common case stays one statement per batch.

use pgrx::prelude::*;
use std::collections::HashMap;

/// Runs `f` in a subtransaction, the way a plpgsql EXCEPTION block does: an
/// ERROR rolls back what `f` did and comes back as `Err(message)`. A cancel
/// of the caller's statement (pg_cancel_backend, a client's ^C) is not one
/// user's failure: it is raised again, and the caller's statement ends.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let result: Result<R, (String, bool)> = unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        // allocate in the caller's context, so that results outlive the subtransaction
        pg_sys::MemoryContextSwitchTo(context);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
            .catch_others(|e| {
                let cancelled = is_cancel(&e);
                Err((crate::spi_util::caught_message(e), cancelled))
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
        Err((message, true)) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_QUERY_CANCELED, message);
        }
        other => other.map_err(|(message, _)| message),
    }
}

/// A query cancel that came from outside (57014, but not the statement
/// timeout that `user_sql` arms around a definer's query, which fails only
/// the users it was for).
fn is_cancel(e: &pg_sys::panic::CaughtError) -> bool {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
            r.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
                && !r.message().contains("statement timeout")
        }
        pg_sys::panic::CaughtError::RustPanic { .. } => false,
    }
}

/// Looks up `users` with `lookup` (one statement for a whole slice of users).
/// Users missing from a successful lookup are absent from the result; users
/// whose lookup fails map to `Err(message)`.
pub fn per_user<T>(
    users: &[String],
    lookup: impl Fn(&[String]) -> HashMap<String, T>,
) -> HashMap<String, Result<T, String>> {
    match subtransaction(|| lookup(users)) {
        Ok(found) => found.into_iter().map(|(u, v)| (u, Ok(v))).collect(),
        Err(_) => {
            let mut out = HashMap::new();
            for u in users {
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
