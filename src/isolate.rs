//! Running SQL that users wrote (the profile query now; audience and context
//! queries next) so that one user's failure fails only that user's message.
//!
//! The batch runs as one statement inside a subtransaction; only if it fails
//! is it run again one user at a time, each in a subtransaction of its own,
//! to find whose lookup fails. The common case stays one statement per batch.

use pgrx::prelude::*;
use std::collections::HashMap;

/// Runs `f` in a subtransaction, the way a plpgsql EXCEPTION block does: an
/// ERROR rolls back what `f` did and comes back as `Err(message)`.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        // allocate in the caller's context, so that results outlive the subtransaction
        pg_sys::MemoryContextSwitchTo(context);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
            .catch_others(|e| Err(crate::spi_util::caught_message(e)))
            .execute();
        match result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
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
