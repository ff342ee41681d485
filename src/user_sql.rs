//! SQL that users write into definitions (audience_sql, context queries).
//!
//! Each query becomes a SECURITY DEFINER function created by, and so owned
//! by, the role that defines the trigger: it runs with that role's
//! privileges, never as the worker's superuser. It is checked when defined
//! (run once with no user, as that role), called once per batch for all the
//! batch's users, under `nudge.user_sql_timeout`, and a user whose call fails
//! fails alone (`isolate::per_user`).

use crate::isolate;
use crate::spi_util::{in_context, or_raise};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::HashMap;

/// What a query answers: a yes/no about the user, or data for the template.
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Audience,
    Context,
}

/// Checks a query as the calling role: it must parse, the role must be
/// allowed to read what it reads, and an audience query must return one
/// boolean column. `$1` is the user id (NULL here, so nothing is read).
pub fn check(part: &str, sql: &str, kind: Kind) {
    let sql = trimmed(sql);
    let boolean = in_context(part, || {
        Spi::connect(|c| {
            let t = or_raise(
                c.select(
                    &format!("SELECT * FROM ({sql}) AS q LIMIT 0"),
                    None,
                    &[Option::<String>::None.into()],
                ),
                part,
            );
            t.columns().unwrap_or(0) == 1
                && t.column_type_oid(1).ok().map(|o| o.value()) == Some(pg_sys::BOOLOID)
        })
    });
    if kind == Kind::Audience && !boolean {
        error!("{part}: must return one boolean column, e.g. SELECT count(*) >= 3 FROM app.orders WHERE customer_id = $1");
    }
}

/// Creates the function for one query of one trigger version and records it.
pub fn create(
    c: &mut SpiClient<'_>,
    trigger: &str,
    version: i32,
    part: &str,
    sql: &str,
    kind: Kind,
) {
    let id: i64 = or_raise(
        c.update("SELECT nextval('nudge.user_sql_id')", None, &[]),
        part,
    )
    .first()
    .get_one()
    .ok()
    .flatten()
    .expect("nextval");
    let function = format!("nudge._user_sql_{id}");
    let sql = trimmed(sql);
    let (returns, body) = match kind {
        Kind::Audience => ("boolean", format!("SELECT coalesce((SELECT q.* FROM ({sql}) AS q LIMIT 1), false)")),
        // one row: an object; several: a list; none: null
        Kind::Context => (
            "jsonb",
            format!(
                "SELECT CASE count(*) WHEN 0 THEN NULL WHEN 1 THEN (array_agg(to_jsonb(q)))[1] ELSE jsonb_agg(to_jsonb(q)) END
                   FROM ({sql}) AS q"
            ),
        ),
    };
    let mut tag = String::from("nudge_sql");
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    or_raise(
        c.update(
            &format!(
                "CREATE FUNCTION {function}(text) RETURNS {returns} LANGUAGE sql STABLE SECURITY DEFINER
                 SET search_path FROM CURRENT AS ${tag}${body}${tag}$"
            ),
            None,
            &[],
        ),
        part,
    );
    or_raise(
        c.update(
            "INSERT INTO nudge.user_sql (trigger, version, part, function) VALUES ($1, $2, $3, $4)",
            None,
            &[trigger.into(), version.into(), part.into(), function.into()],
        ),
        part,
    );
}

/// The functions of these trigger versions: (trigger, part) -> function.
pub fn registry(
    c: &SpiClient<'_>,
    versions: Vec<(String, i32)>,
) -> HashMap<(String, String), String> {
    let (t, v): (Vec<String>, Vec<i32>) = versions.into_iter().unzip();
    if t.is_empty() {
        return HashMap::new();
    }
    or_raise(
        c.select(
            "SELECT u.trigger, u.part, u.function FROM nudge.user_sql u
               JOIN unnest($1::text[], $2::int[]) AS x(trigger, version) USING (trigger, version)",
            None,
            &[t.into(), v.into()],
        ),
        "reading user SQL",
    )
    .map(|r| {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        ((s(1), s(2)), s(3))
    })
    .collect()
}

/// Calls `function` for each user: one statement for all of them, under the
/// timeout; users whose call fails get `Err`, and only they.
pub fn call(
    c: &SpiClient<'_>,
    function: &str,
    users: &[String],
) -> HashMap<String, Result<Value, String>> {
    let query = format!("SELECT u, to_jsonb({function}(u)) FROM unnest($1::text[]) u");
    // every attempt (the batch, then each user if it failed) gets the full timeout
    isolate::per_user(users, |some| {
        with_timeout(|| {
            or_raise(
                c.select(&query, None, &[some.to_vec().into()]),
                "running user SQL",
            )
            .filter_map(|r| {
                let u: String = r.get(1).ok().flatten()?;
                let v = r
                    .get::<JsonB>(2)
                    .ok()
                    .flatten()
                    .map_or(Value::Null, |j| j.0);
                Some((u, v))
            })
            .collect()
        })
    })
}

fn trimmed(sql: &str) -> &str {
    sql.trim().trim_end_matches(';').trim()
}

// utils/timeout.h is not in pgrx's bindings; STATEMENT_TIMEOUT is 3 from
// PostgreSQL 13 to 18.
const STATEMENT_TIMEOUT: u32 = 3;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: u32, delay_ms: i32);
    fn disable_timeout(id: u32, keep_indicator: bool);
    fn get_timeout_active(id: u32) -> bool;
}

/// Runs `f` under nudge.user_sql_timeout: a query that runs longer is
/// cancelled with "canceling statement due to statement timeout", which the
/// per-user isolation turns into that user's failure. Inside a client
/// statement that already has a statement timeout, that one governs.
fn with_timeout<R>(f: impl FnOnce() -> R) -> R {
    let ms = crate::settings::USER_SQL_TIMEOUT_MS.get();
    let armed = ms > 0 && unsafe { !get_timeout_active(STATEMENT_TIMEOUT) };
    if armed {
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT, ms) };
    }
    // disarmed on the way out, also when `f` raises an error
    struct Disarm(bool);
    impl Drop for Disarm {
        fn drop(&mut self) {
            if self.0 {
                unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
            }
        }
    }
    let _disarm = Disarm(armed);
    f()
}
