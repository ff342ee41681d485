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
use nudge_core::sql::{definer_search_path, ident};
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
    /// the profile query (set_profile_query): one JSON object per user
    Profile,
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

/// The role defining a query, as it was when it called us: the function is
/// given to it, and runs with the search path it had (pg_temp moved last).
pub struct Definer {
    pub role: pg_sys::Oid,
    pub search_path: String,
}

impl Definer {
    /// The calling role and its search path, read before anything of ours
    /// pins the path.
    pub fn current() -> Definer {
        let path = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')")
            .ok()
            .flatten()
            .unwrap_or_default();
        Definer {
            role: crate::privilege::current_role(),
            search_path: definer_search_path(&path),
        }
    }
}

/// Creates the function for one query of one trigger version (or of the
/// profile) and records it. Runs as the extension's owner, who creates the
/// function in our schema (no role of ours may), takes EXECUTE away from
/// PUBLIC and gives the function to the definer, so that it runs with the
/// definer's rights and no more. Its settings are recorded: a function whose
/// owner, security or settings change afterwards is refused at call time.
pub fn create(
    c: &mut SpiClient<'_>,
    owner: (&str, i32, &str),
    sql: &str,
    kind: Kind,
    definer: &Definer,
) {
    let (trigger, version, part) = owner;
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
        // every name of ours qualified: the definer's path may hold a schema
        // where someone else can plant a better-matching overload
        Kind::Audience => (
            "boolean",
            format!("SELECT coalesce((SELECT q.* FROM ({sql}) AS q LIMIT 1), false)"),
        ),
        // one row: an object; several: a list; none: null
        Kind::Context => (
            "jsonb",
            format!(
                "SELECT CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.=) 0 THEN NULL
                            WHEN pg_catalog.count(*) OPERATOR(pg_catalog.=) 1
                            THEN (pg_catalog.array_agg(pg_catalog.to_jsonb(q)))[1]
                            ELSE pg_catalog.jsonb_agg(pg_catalog.to_jsonb(q)) END
                   FROM ({sql}) AS q"
            ),
        ),
        Kind::Profile => (
            "jsonb",
            format!("SELECT pg_catalog.to_jsonb(p) FROM ({sql}) AS p LIMIT 1"),
        ),
    };
    let mut tag = String::from("nudge_sql");
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    let role = role_name(c, definer.role);
    for (statement, doing) in [
        (
            format!(
                "CREATE FUNCTION {function}(text) RETURNS {returns} LANGUAGE sql STABLE SECURITY DEFINER
                 SET search_path = {} AS ${tag}${body}${tag}$",
                definer.search_path
            ),
            part,
        ),
        (
            format!("REVOKE ALL ON FUNCTION {function}(text) FROM PUBLIC"),
            "revoking EXECUTE from PUBLIC",
        ),
        // dropped with the extension, yet dumped by pg_dump (not a member)
        (
            format!("ALTER FUNCTION {function}(text) DEPENDS ON EXTENSION pg_nudge"),
            "tying the function to the extension",
        ),
        (
            format!("ALTER FUNCTION {function}(text) OWNER TO {}", ident(&role)),
            "giving the function to its definer",
        ),
    ] {
        or_raise(c.update(&statement, None, &[]), doing);
    }
    or_raise(
        c.update(
            "INSERT INTO nudge.user_sql (trigger, version, part, function, owner, config)
             SELECT $1, $2, $3, $4, $5, p.proconfig FROM pg_catalog.pg_proc p
              WHERE p.oid = pg_catalog.to_regprocedure($4 || '(text)')",
            None,
            &[
                trigger.into(),
                version.into(),
                part.into(),
                function.into(),
                role.into(),
            ],
        ),
        part,
    );
}

fn role_name(c: &SpiClient<'_>, role: pg_sys::Oid) -> String {
    or_raise(
        c.select(
            "SELECT rolname::text FROM pg_catalog.pg_roles WHERE oid = $1",
            None,
            &[role.into()],
        ),
        "naming the role",
    )
    .first()
    .get_one::<String>()
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("pg_nudge: no role with oid {}", role.to_u32()))
}

/// Where the profile query's function is recorded in nudge.user_sql: no
/// trigger, version 0.
pub const PROFILE: (&str, i32, &str) = ("", 0, "profile");

/// The profile query's function, when set_profile_query gave one.
pub fn profile_function(c: &SpiClient<'_>) -> Option<Registered> {
    registry(c, vec![(PROFILE.0.to_string(), PROFILE.1)])
        .remove(&(PROFILE.0.to_string(), PROFILE.2.to_string()))
}

/// Forgets the profile query: its record and its function.
pub fn forget_profile(c: &mut SpiClient<'_>) {
    let gone: Vec<String> = or_raise(
        c.update(
            "DELETE FROM nudge.user_sql WHERE trigger = $1 AND version = $2 AND part = $3 RETURNING function",
            None,
            &[PROFILE.0.into(), PROFILE.1.into(), PROFILE.2.into()],
        ),
        "set_profile_query",
    )
    .filter_map(|r| r.get::<String>(1).ok().flatten())
    .collect();
    for f in gone {
        if f.starts_with("nudge._user_sql_") || f == "nudge._profile" {
            or_raise(
                c.update(&format!("DROP FUNCTION IF EXISTS {f}(text)"), None, &[]),
                "dropping the previous profile query",
            );
        }
    }
}

/// See `nudge._secure_user_sql`. Returns how many functions it looked at.
pub fn secure_existing(c: &mut SpiClient<'_>) -> i64 {
    // 0.2.0 kept the profile query in nudge._profile: the built-in one goes
    // (the table is read directly now), a user's one is registered
    let profile = or_raise(
        c.select(
            "SELECT r.rolname::text, p.prosrc LIKE '%FROM nudge.profiles p WHERE p.user_id = $1%'
               FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
              WHERE p.oid = pg_catalog.to_regprocedure('nudge._profile(text)')",
            None,
            &[],
        ),
        "reading nudge._profile",
    )
    .map(|r| {
        (
            r.get::<String>(1).ok().flatten().unwrap_or_default(),
            r.get::<bool>(2).ok().flatten().unwrap_or(false),
        )
    })
    .next();
    match profile {
        Some((_, true)) => {
            or_raise(
                c.update("DROP FUNCTION nudge._profile(text)", None, &[]),
                "dropping nudge._profile",
            );
        }
        Some((owner, false)) => {
            or_raise(
                c.update(
                    "INSERT INTO nudge.user_sql (trigger, version, part, function, owner)
                     VALUES ($1, $2, $3, 'nudge._profile', $4) ON CONFLICT DO NOTHING",
                    None,
                    &[
                        PROFILE.0.into(),
                        PROFILE.1.into(),
                        PROFILE.2.into(),
                        owner.into(),
                    ],
                ),
                "registering nudge._profile",
            );
        }
        None => {}
    }
    let functions: Vec<(String, String)> = or_raise(
        c.select(
            "SELECT p.oid::pg_catalog.regprocedure::text,
                    coalesce((SELECT substr(s, 13) FROM pg_catalog.unnest(p.proconfig) s
                               WHERE s LIKE 'search_path=%'), '')
               FROM nudge.user_sql u
               JOIN pg_catalog.pg_proc p ON p.oid = pg_catalog.to_regprocedure(u.function || '(text)')
              WHERE p.pronamespace = 'nudge'::pg_catalog.regnamespace",
            None,
            &[],
        ),
        "reading user SQL",
    )
    .map(|r| {
        (
            r.get::<String>(1).ok().flatten().unwrap_or_default(),
            r.get::<String>(2).ok().flatten().unwrap_or_default(),
        )
    })
    .collect();
    for (function, path) in &functions {
        for statement in [
            format!("REVOKE ALL ON FUNCTION {function} FROM PUBLIC, nudge_admin, nudge_writer, nudge_mailer"),
            format!("ALTER FUNCTION {function} DEPENDS ON EXTENSION pg_nudge"),
            format!(
                "ALTER FUNCTION {function} SET search_path = {}",
                definer_search_path(path)
            ),
        ] {
            or_raise(c.update(&statement, None, &[]), "securing user SQL");
        }
    }
    or_raise(
        c.update(
            "UPDATE nudge.user_sql u SET config = p.proconfig
               FROM pg_catalog.pg_proc p WHERE p.oid = pg_catalog.to_regprocedure(u.function || '(text)')",
            None,
            &[],
        ),
        "recording user SQL settings",
    );
    functions.len() as i64
}

/// One generated function as the registry found it.
#[derive(Clone)]
pub struct Registered {
    pub function: String,
    /// its owner now, when it is still the role recorded as its definer
    pub owner: pg_sys::Oid,
    /// why it must not run: changed or dropped since pg_nudge created it
    pub refused: Option<String>,
}

/// The functions of these trigger versions: (trigger, part) -> function,
/// each checked against what was recorded when it was created.
pub fn registry(
    c: &SpiClient<'_>,
    versions: Vec<(String, i32)>,
) -> HashMap<(String, String), Registered> {
    let (t, v): (Vec<String>, Vec<i32>) = versions.into_iter().unzip();
    if t.is_empty() {
        return HashMap::new();
    }
    or_raise(
        c.select(
            "SELECT u.trigger, u.part, u.function, p.proowner,
                    CASE WHEN p.oid IS NULL THEN 'it no longer exists'
                         WHEN u.function !~ '^nudge\\._(user_sql_[0-9]+|profile)$' OR p.pronamespace <> 'nudge'::pg_catalog.regnamespace
                              THEN 'it is not one pg_nudge created'
                         WHEN r.oid IS DISTINCT FROM p.proowner THEN 'its owner changed'
                         WHEN NOT p.prosecdef THEN 'it is no longer SECURITY DEFINER'
                         WHEN p.proconfig IS DISTINCT FROM u.config THEN 'its settings changed'
                    END
               FROM nudge.user_sql u
               JOIN unnest($1::text[], $2::int[]) AS x(trigger, version) USING (trigger, version)
               LEFT JOIN pg_catalog.pg_proc p ON p.oid = pg_catalog.to_regprocedure(u.function || '(text)')
               LEFT JOIN pg_catalog.pg_roles r ON r.rolname = u.owner",
            None,
            &[t.into(), v.into()],
        ),
        "reading user SQL",
    )
    .map(|r| {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        let function = s(3);
        let refused = r.get::<String>(5).ok().flatten().map(|why| {
            format!("user SQL function {function} is refused: {why} since pg_nudge created it (define the trigger again)")
        });
        let owner = r.get::<pg_sys::Oid>(4).ok().flatten().unwrap_or(pg_sys::InvalidOid);
        ((s(1), s(2)), Registered { function, owner, refused })
    })
    .collect()
}

/// Calls the function for each user: one statement for all of them, as its
/// definer, under the timeout; users whose call fails get `Err`, and only
/// they. A refused function fails every user, without running.
pub fn call(
    c: &SpiClient<'_>,
    f: &Registered,
    users: &[String],
) -> HashMap<String, Result<Value, crate::isolate::Failure>> {
    if let Some(why) = &f.refused {
        return users
            .iter()
            .map(|u| {
                (
                    u.clone(),
                    Err(crate::isolate::Failure::permanent(why.clone())),
                )
            })
            .collect();
    }
    let query = format!(
        "SELECT u, pg_catalog.to_jsonb({}(u)) FROM pg_catalog.unnest($1::text[]) u",
        f.function
    );
    // every attempt (the batch, then each user if it failed) gets the full
    // timeout; finding the slow users gets twice that, the rest try later
    isolate::per_user(users, crate::settings::user_sql_budget(), |some| {
        crate::privilege::as_definer(f.owner, || {
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
