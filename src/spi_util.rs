//! Small conversions between pgrx and nudge-core types.

use pgrx::prelude::*;

/// nudge-core counts time in microseconds; Postgres' timestamptz is
/// microseconds since 2000-01-01 UTC, so the two meet without conversion.
pub fn micros(t: TimestampWithTimeZone) -> i64 {
    t.into_inner()
}

pub fn ts(us: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(us).unwrap_or_else(|e| error!("timestamp out of range: {e:?}"))
}

/// Raises a Postgres ERROR for a failed SPI call, naming what was being done.
pub fn or_raise<T, E: std::fmt::Display>(r: Result<T, E>, doing: &str) -> T {
    r.unwrap_or_else(|e| error!("pg_nudge: {doing}: {e}"))
}

/// The first column of the first row of a statement run to completion.
///
/// Not `Spi::get_one_with_args`: that runs with a row limit of 1, and a
/// limited `INSERT ... RETURNING` stops before its statement-level AFTER
/// triggers fire, so an event inserted that way would never be captured.
pub fn one<T: FromDatum + IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    doing: &str,
) -> Option<T> {
    Spi::connect_mut(|c| {
        let rows = or_raise(c.update(query, None, args), doing);
        if rows.is_empty() {
            None
        } else {
            or_raise(rows.first().get_one::<T>(), doing)
        }
    })
}

/// Runs `f`; an ERROR it raises (bad SQL a user wrote, say) is raised again
/// with `doing` in front, so that the message says which input was wrong.
/// The transaction aborts as it would have; nothing is resumed after the error.
pub fn in_context<R>(doing: &str, f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::RustPanic { .. } => e.rethrow(),
            other => error!("{doing}: {}", caught_message(other)),
        })
        .execute()
}

/// The message of an error caught by PgTryBuilder, whatever raised it.
pub fn caught_message(e: pg_sys::panic::CaughtError) -> String {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}

/// Events of these users and names in [from, to] from every source, as
/// (user, event, time, props): the history capture reads back.
pub fn history(
    c: &pgrx::spi::SpiClient<'_>,
    users: Vec<String>,
    events: Vec<String>,
    from: i64,
    to: i64,
    doing: &str,
) -> Vec<(String, String, i64, serde_json::Value)> {
    or_raise(
        c.select(
            "SELECT user_id, event, occurred_at, props FROM nudge.all_events
              WHERE user_id = ANY ($1) AND event = ANY ($2) AND occurred_at BETWEEN $3 AND $4",
            None,
            &[users.into(), events.into(), ts(from).into(), ts(to).into()],
        ),
        doing,
    )
    .filter_map(|r| {
        let at: TimestampWithTimeZone = r.get(3).ok().flatten()?;
        Some((
            r.get::<String>(1).ok().flatten()?,
            r.get::<String>(2).ok().flatten()?,
            micros(at),
            r.get::<pgrx::JsonB>(4)
                .ok()
                .flatten()
                .map_or(serde_json::Value::Null, |j| j.0),
        ))
    })
    .collect()
}

/// Each value once (order unspecified): the users or names a batch reads for.
pub fn distinct(items: impl Iterator<Item = String>) -> Vec<String> {
    items
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect()
}
