//! Small conversions between pgrx and nudge-core types.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// nudge-core counts time in microseconds; Postgres' timestamptz is
/// microseconds since 2000-01-01 UTC, so the two meet without conversion.
pub fn micros(t: TimestampWithTimeZone) -> i64 {
    t.into_inner()
}

pub fn ts(us: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(us).unwrap_or_else(|e| error!("timestamp out of range: {e:?}"))
}

thread_local! {
    /// Plans of our own statements, kept for the life of the backend: parsing
    /// and planning cost more than running most of them (capture runs a few
    /// per inserting statement). PostgreSQL's plan cache revalidates them when
    /// a table they use changes.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs one of pg_nudge's own statements to completion through its kept plan.
/// Each call site passes the same argument types every time.
pub fn run<'c>(
    c: &SpiClient<'c>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
    doing: &str,
) -> SpiTupleTable<'c> {
    debug_assert!(!sql.contains(crate::all_events::TOKEN), "use run_per_owner");
    run_text(c, sql.into(), args, doing)
}

/// Runs a statement that reads `nudge.all_events` once for each owner of
/// registered sources, over that owner's sources only, planned and run as
/// that owner (`privilege::as_definer`): whatever code a table's owner
/// attached to it runs with no more than its owner's rights. `each` gets
/// each owner's rows; a new set of sources is a new statement with a plan of
/// its own.
pub fn run_per_owner(
    c: &SpiClient<'_>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
    doing: &str,
    mut each: impl FnMut(SpiTupleTable<'_>),
) {
    for g in crate::all_events::groups(c).iter() {
        let text = sql.replace(crate::all_events::TOKEN, &g.union);
        crate::privilege::as_definer(g.owner, || each(run_text(c, text.into(), args, doing)));
    }
}

fn run_text<'c>(
    c: &SpiClient<'c>,
    text: std::borrow::Cow<'_, str>,
    args: &[DatumWithOid<'_>],
    doing: &str,
) -> SpiTupleTable<'c> {
    // on a Citus node, the shard group's tables (src/citus.rs)
    let text = match crate::citus::current() {
        Some(g) => std::borrow::Cow::Owned(g.rewrite(&text)),
        None => text,
    };
    let plan = match PLANS.with(|p| p.borrow().get(text.as_ref()).cloned()) {
        Some(plan) => plan,
        None => {
            let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
            // prepare_mut: run as a read-write statement (DML, nextval, locks)
            let plan = Rc::new(or_raise(c.prepare_mut(text.as_ref(), &types), doing).keep());
            PLANS.with(|p| p.borrow_mut().insert(text.into_owned(), plan.clone()));
            plan
        }
    };
    or_raise(c.select(&*plan, None, args), doing)
}

/// Raises an ERROR with SQLSTATE 22023 (invalid_parameter_value): what the
/// caller passed is wrong, and the message says where.
pub fn invalid(message: impl Into<String>) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message.into()
    );
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
    in_context_with_hint(doing, None, f)
}

/// `in_context`, with a hint that says what the caller's SQL gets.
pub fn in_context_with_hint<R>(doing: &str, hint: Option<&str>, f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::RustPanic { .. } => e.rethrow(),
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => {
                // the SQLSTATE stays the one PostgreSQL gave (42501 for a
                // table the definer may not read, 42601 for a syntax error)
                let message = format!("{doing}: {}", r.message());
                if let Some(h) = hint {
                    ereport!(ERROR, r.sql_error_code(), message, h);
                }
                ereport!(ERROR, r.sql_error_code(), message);
            }
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

/// The keys a history read is about: their JSON values at `path`, the same
/// as text, and whether a missing key (key '') is one of them.
pub struct KeyFilter {
    pub path: Vec<String>,
    pub values: Vec<pgrx::JsonB>,
    pub texts: Vec<String>,
    pub missing: bool,
}

impl KeyFilter {
    /// The filter for the keys these events (props) have under `trigger`,
    /// or None when the trigger has no key.
    pub fn of<'a>(
        trigger: &nudge_core::definition::Trigger,
        props: impl Iterator<Item = &'a serde_json::Value>,
    ) -> Option<KeyFilter> {
        let path = trigger.key_path.as_ref()?;
        let mut f = KeyFilter {
            path: path.clone(),
            values: vec![],
            texts: vec![],
            missing: false,
        };
        let mut seen = std::collections::HashSet::new();
        for p in props {
            let text = trigger.key_of(p);
            f.missing |= text.is_empty();
            if let Some(v) = nudge_core::predicate::lookup(p, path) {
                if seen.insert(text.clone()) {
                    f.values.push(pgrx::JsonB(v.clone()));
                    f.texts.push(text);
                }
            }
        }
        Some(f)
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
    keys: Option<KeyFilter>,
    doing: &str,
) -> Vec<(String, String, i64, serde_json::Value)> {
    let mut out = vec![];
    let mut collect = |rows: SpiTupleTable<'_>| {
        out.extend(rows.filter_map(|r| {
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
        }))
    };
    match keys {
        None => run_per_owner(
            c,
            "SELECT user_id, event, occurred_at, props FROM nudge.all_events e
              WHERE user_id = ANY ($1) AND event = ANY ($2) AND occurred_at BETWEEN $3 AND $4",
            &[users.into(), events.into(), ts(from).into(), ts(to).into()],
            doing,
            &mut collect,
        ),
        // Only events whose key is one of these (compared as JSON and as
        // text, so that every row Trigger::key_of would match is kept):
        // a heavy user's other keys stay in the table.
        Some(k) => run_per_owner(
            c,
            "SELECT user_id, event, occurred_at, props FROM nudge.all_events e
              WHERE user_id = ANY ($1) AND event = ANY ($2) AND occurred_at BETWEEN $3 AND $4
                AND (props #> $5 = ANY ($6) OR props #>> $5 = ANY ($7)
                     OR ($8 AND coalesce(props #> $5, 'null') = 'null'))",
            &[
                users.into(),
                events.into(),
                ts(from).into(),
                ts(to).into(),
                k.path.into(),
                k.values.into(),
                k.texts.into(),
                k.missing.into(),
            ],
            doing,
            &mut collect,
        ),
    };
    out
}

/// Each value once (order unspecified): the users or names a batch reads for.
pub fn distinct(items: impl Iterator<Item = String>) -> Vec<String> {
    items
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect()
}
