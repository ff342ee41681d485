//! The SQL surface (docs/architecture.md, "Public SQL surface"). Each function checks
//! its arguments and hands over to the modules that do the work.

use crate::catalog;
use crate::engine::{capture, compose, run_due as due};
use crate::privilege::{as_extension, pinned};
use crate::sources;
use crate::spi_util::{in_context_with_hint, invalid, one, or_raise};
use crate::user_sql;
use nudge_core::definition::{context_part, Definition, AUDIENCE_SQL};
use nudge_core::render::Template;
use nudge_core::sql::SourceMap;
use pgrx::prelude::*;
use pgrx::JsonB;

#[pg_extern]
fn track(
    user_id: &str,
    event: &str,
    props: default!(JsonB, "'{}'"),
    occurred_at: default!(TimestampWithTimeZone, "now()"),
) -> i64 {
    if !props.0.is_object() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("track: props must be a JSON object, got {}", props.0)
        );
    }
    if user_id.is_empty() || event.is_empty() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "track: user_id and event must not be empty"
        );
    }
    if !nudge_core::time::is_event_time(occurred_at.into_inner()) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
            format!("track: occurred_at {occurred_at} is outside the times pg_nudge captures"),
            "an event time is between 1900-01-01 and 9999-12-31"
        );
    }
    // as the caller (nudge_writer may insert events), with our search path
    pinned(|| {
        one::<i64>(
            "INSERT INTO nudge.events (user_id, event, props, occurred_at) VALUES ($1, $2, $3, $4) RETURNING id",
            &[user_id.into(), event.into(), props.into(), occurred_at.into()],
            "track",
        )
    })
    .expect("INSERT RETURNING gives the id")
}

#[pg_extern]
fn _capture(
    users: Vec<Option<String>>,
    events: Vec<Option<String>>,
    times: Vec<Option<TimestampWithTimeZone>>,
    props: Vec<Option<JsonB>>,
) {
    // only 0.1.0's capture functions (SECURITY DEFINER) call it
    pinned(|| {
        capture::capture(capture::Batch {
            users,
            events,
            times,
            props,
        })
    });
}

/// Checks the segments of the users whose profiles a statement wrote (the
/// statement triggers on nudge.profiles call it; docs/reference.md, "Segment entry").
#[pg_extern]
fn _profiles_changed(users: Vec<Option<String>>) {
    let users: Vec<String> = users.into_iter().flatten().collect();
    if !users.is_empty() {
        pinned(|| crate::engine::segments::profiles_changed(users));
    }
}

/// Brings the generated functions of an older version under today's rules
/// (pg_temp last in their search path, no EXECUTE for PUBLIC, their settings
/// recorded) and moves 0.2.0's `nudge._profile` into the registry. The
/// upgrade script runs it; running it again changes nothing.
#[pg_extern]
fn _secure_user_sql() -> i64 {
    as_extension(|| Spi::connect_mut(|c| user_sql::secure_existing(c)))
}

/// The capture trigger of every source (`sources` creates it; finalize.sql
/// makes it SECURITY DEFINER, so that inserting needs no right on our tables).
#[pg_trigger]
fn _capture_rows<'a>(
    t: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let args = t.extra_args()?;
    // a shard on a Citus node: capture writes the shards of its group
    let group = match crate::citus::relation(t.relid()?, &t.table_name()?) {
        crate::citus::Relation::Plain => None,
        crate::citus::Relation::Shard(g) => Some(g),
        crate::citus::Relation::Unregistered => {
            warning!(
                "pg_nudge: {} is not a registered source's shard on this node: its rows are not captured (docs/citus.md)",
                t.table_name()?
            );
            return Ok(None);
        }
    };
    crate::citus::within(group, || unsafe {
        crate::engine::transition::capture_statement(t.trigger_data(), &args)
    });
    Ok(None)
}

/// The row trigger of a source's watched columns (`watch_changes` creates it).
#[pg_trigger]
fn _capture_changes<'a>(
    t: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let args = t.extra_args()?;
    unsafe { crate::engine::changes::capture_row(t.trigger_data(), &args) };
    Ok(None)
}

/// The statement trigger after an UPDATE of a source with watched columns.
#[pg_trigger]
fn _changes_done<'a>(
    _t: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    crate::engine::changes::statement_done();
    Ok(None)
}

#[pg_extern]
fn _watch_changes(source: pg_sys::Oid, columns: Vec<Option<String>>) {
    sources::watch_changes(source, columns.into_iter().flatten().collect());
}

/// Statement trigger on nudge.triggers: every backend drops its compiled triggers.
#[pg_trigger]
fn _triggers_changed<'a>(
    t: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    catalog::invalidate(t.relid()?);
    Ok(None)
}

#[pg_extern]
fn _add_source(
    source: pg_sys::Oid,
    user_column: &str,
    event_column: Option<&str>,
    time_column: Option<&str>,
    props_column: Option<&str>,
    event_name: Option<&str>,
) {
    sources::add(
        source,
        SourceMap {
            user_column: user_column.to_owned(),
            event_column: event_column.map(str::to_owned),
            time_column: time_column.map(str::to_owned),
            props_column: props_column.map(str::to_owned),
            event_name: event_name.map(str::to_owned),
        },
    );
}

#[pg_extern]
fn _drop_source(source: pg_sys::Oid) {
    sources::drop(source);
}

#[pg_extern]
fn define_template(
    name: &str,
    subject: &str,
    html: &str,
    text_body: default!(Option<&str>, "NULL"),
) {
    if name.trim().is_empty() {
        invalid(format!("define_template: name must not be empty"));
    }
    if let Err(e) = Template::parse(subject, html, text_body) {
        invalid(format!("define_template({name}): {e}"));
    }
    pinned(|| {
        or_raise(
        Spi::run_with_args(
            "INSERT INTO nudge.templates (name, subject, html, text_body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE
                SET subject = EXCLUDED.subject, html = EXCLUDED.html,
                    text_body = EXCLUDED.text_body, updated_at = EXCLUDED.updated_at",
            &[name.into(), subject.into(), html.into(), text_body.into()],
        ),
        "define_template",
    )
    });
}

#[pg_extern]
fn define_trigger(name: &str, definition: JsonB) -> i32 {
    if name.trim().is_empty() {
        invalid(format!("define_trigger: name must not be empty"));
    }
    let def = Definition::parse(&definition.0)
        .unwrap_or_else(|e| invalid(format!("define_trigger({name}): {e}")));
    let trigger = def
        .compile(name, 0)
        .unwrap_or_else(|e| invalid(format!("define_trigger({name}): {e}")));
    let variant_paths: Vec<(String, &String)> = def
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("variants[{i}].template"), &v.template))
        .chain(def.steps.iter().enumerate().flat_map(|(i, s)| {
            std::iter::once((format!("steps[{i}].template"), &s.template)).chain(
                s.variants
                    .iter()
                    .map(move |(arm, t)| (format!("steps[{i}].variants.{arm}"), t)),
            )
        }))
        .collect();
    for (path, template) in def
        .template
        .as_ref()
        .map(|t| ("template", t))
        .into_iter()
        .chain(
            def.fallback_template
                .as_ref()
                .map(|f| ("fallback_template", f)),
        )
        .chain(variant_paths.iter().map(|(p, t)| (p.as_str(), *t)))
    {
        let exists = pinned(|| {
            one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM nudge.templates WHERE name = $1)",
                &[template.clone().into()],
                "define_trigger",
            )
        })
        .unwrap_or(false);
        if !exists {
            invalid(format!("define_trigger({name}): {path}: no template named {template:?} (create it first with nudge.define_template)"));
        }
    }
    // SQL in the definition is checked as the defining role, before anything is written.
    let user_sql: Vec<(String, &String, user_sql::Kind)> = def
        .audience_sql
        .iter()
        .map(|q| (AUDIENCE_SQL.to_string(), q, user_sql::Kind::Audience))
        .chain(
            def.context
                .iter()
                .map(|(n, q)| (context_part(n), q, user_sql::Kind::Context)),
        )
        .collect();
    if !user_sql.is_empty() {
        crate::citus::refuse_on_cluster(&format!(
            "define_trigger({name}): SQL in a definition ({})",
            user_sql[0].0
        ));
    }
    if trigger.watches_profile() {
        crate::citus::refuse_on_cluster(&format!(
            "define_trigger({name}): a segment or a date from profiles"
        ));
    }
    for (part, sql, kind) in &user_sql {
        user_sql::check(&format!("define_trigger({name}): {part}"), sql, *kind);
    }
    let definer = user_sql::Definer::current();
    let mut watches: Vec<String> = trigger.watched_events().map(str::to_owned).collect();
    watches.sort();
    watches.dedup();
    warn_of_unseen_events(name, &watches);
    // the catalog that names functions is written by the extension's owner only
    as_extension(|| {
        // plain statements, one table each: Citus plans a data-modifying
        // CTE over its reference tables wrongly (docs/citus.md)
        let version = one::<i32>(
            "SELECT coalesce(max(version), 0) + 1 FROM nudge.trigger_versions WHERE trigger = $1",
            &[name.into()],
            "define_trigger",
        )
        .expect("an aggregate returns a row");
        Spi::run_with_args(
            "INSERT INTO nudge.trigger_versions (trigger, version, definition, created_by)
             VALUES ($1, $2, $3, $4::oid::regrole::name)",
            &[
                name.into(),
                version.into(),
                definition.into(),
                definer.role.into(),
            ],
        )
        .unwrap_or_else(|e| error!("pg_nudge: define_trigger: {e}"));
        let version = one::<i32>(
            "INSERT INTO nudge.triggers AS t (name, version, watches, owner)
             VALUES ($1, $2, $3, $4::oid::regrole::name)
             ON CONFLICT (name) DO UPDATE
                SET version = EXCLUDED.version, watches = EXCLUDED.watches, owner = EXCLUDED.owner, updated_at = EXCLUDED.updated_at
             RETURNING t.version",
            &[name.into(), version.into(), watches.into(), definer.role.into()],
            "define_trigger",
        )
        .expect("a version is returned");
        Spi::connect_mut(|c| {
            for (part, sql, kind) in &user_sql {
                user_sql::create(c, (name, version, part), sql, *kind, &definer);
            }
        });
        // a segment: who is in it now (and their journeys, with backfill)
        let started = crate::engine::segments::snapshot(&trigger);
        if started > 0 {
            notice!("define_trigger({name}): backfill started {started} journeys");
        }
        version
    })
}

/// A definition that watches an event under a misspelled name never fires,
/// silently: said at once when a name is unknown (no registered table names
/// it, recorded events do not have it) and close to a known one. Only a sample of nudge.events is read: a name that is new
/// on purpose (the application sends it from next week) is no reason to scan
/// a large table, nor to warn.
fn warn_of_unseen_events(name: &str, watches: &[String]) {
    let known: Vec<String> = as_extension(|| {
        one::<Vec<String>>(
            "SELECT coalesce(array_agg(DISTINCT n), '{}') FROM (
                 SELECT event_name AS n FROM nudge.sources WHERE event_name IS NOT NULL
                 UNION ALL SELECT event FROM (SELECT event FROM nudge.events LIMIT 10000) e) k",
            &[],
            "define_trigger",
        )
    })
    .unwrap_or_default();
    for (given, near) in nudge_core::definition::likely_typos(watches, &known) {
        warning!(
            "define_trigger({name}): no event named {given:?} has been seen; did you mean {near:?}?"
        );
    }
}

fn set_status(name: &str, status: &str, verb: &str) {
    let found = as_extension(|| one::<bool>(
            "WITH u AS (UPDATE nudge.triggers SET status = $2, updated_at = now() WHERE name = $1 RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM u)",
            &[name.into(), status.into()],
            verb,
        ))
    .unwrap_or(false);
    if !found {
        invalid(format!("{verb}: no trigger named {name:?}"));
    }
}

#[pg_extern]
fn pause_trigger(name: &str) {
    set_status(name, "paused", "pause_trigger");
}

#[pg_extern]
fn resume_trigger(name: &str) {
    set_status(name, "active", "resume_trigger");
}

/// Drops the trigger and cancels its waiting enrollments and pending messages; its versions,
/// enrollments and journal stay, so that past sends remain explainable.
#[pg_extern]
fn drop_trigger(name: &str) {
    let found = as_extension(|| one::<bool>(
            "WITH d AS (DELETE FROM nudge.triggers WHERE name = $1 RETURNING 1),
                  c AS (UPDATE nudge.enrollments SET state = 'cancelled', rule = 'trigger_dropped',
                                reason = 'trigger dropped', updated_at = now()
                         WHERE trigger = $1 AND state = 'waiting' AND EXISTS (SELECT 1 FROM d)
                        RETURNING user_id, id),
                  j AS (INSERT INTO nudge.journal (user_id, trigger, enrollment_id, at, step, detail, rule)
                        SELECT user_id, $1, id, now(), 'cancelled', 'trigger dropped', 'trigger_dropped' FROM c),
                  -- its messages not yet handed out do not go either
                  o AS (UPDATE nudge.outbox SET status = 'cancelled', rule = 'trigger_dropped',
                               last_error = 'trigger ' || $1 || ' was dropped'
                         WHERE trigger = $1 AND status = 'pending' AND EXISTS (SELECT 1 FROM d)
                        RETURNING user_id, enrollment_id),
                  oe AS (UPDATE nudge.enrollments e SET state = 'cancelled', rule = 'trigger_dropped', updated_at = now(),
                                reason = 'trigger dropped before the message went out'
                           FROM o WHERE e.user_id = o.user_id AND e.id = o.enrollment_id)
             SELECT EXISTS (SELECT 1 FROM d)",
            &[name.into()],
            "drop_trigger",
        ))
    .unwrap_or(false);
    if !found {
        invalid(format!("drop_trigger: no trigger named {name:?}"));
    }
}

/// Enrolls events that capture has not enrolled yet: those the WAL slot holds
/// (`set_capture('wal')`) and those queued by deferred capture
/// (`nudge.deferred_capture`), at most about `max_events` (the slot gives
/// whole transactions); returns how many. The worker does this by itself.
#[pg_extern]
fn capture_pending(max_events: default!(i64, 1000000)) -> i64 {
    as_extension(|| pending(max_events))
}

fn pending(max: i64) -> i64 {
    let from_wal = crate::engine::wal::capture_from_wal(max);
    from_wal + crate::engine::deferred::capture_pending((max - from_wal).max(0))
}

/// How inserts into sources are captured from now on: `immediate` (the
/// inserting statement enrolls), `deferred` (it queues; the worker enrolls)
/// or `wal` (it runs nothing of ours; the worker reads the inserts from a
/// logical replication slot). `immediate` and `deferred` set the database's
/// default of `nudge.deferred_capture` (sessions and roles may still choose).
#[pg_extern]
fn set_capture(mode: &str) -> String {
    let deferred = match mode {
        "wal" => {
            crate::citus::refuse_on_cluster("set_capture('wal')");
            return as_extension(crate::engine::wal::enter);
        }
        "immediate" => false,
        "deferred" => true,
        _ => invalid(format!(
            "set_capture: mode must be 'immediate', 'deferred' or 'wal', not {mode:?}"
        )),
    };
    as_extension(|| {
        let left = crate::engine::wal::leave();
        let setting = if deferred {
            "SET nudge.deferred_capture = on"
        } else {
            "RESET nudge.deferred_capture"
        };
        let db = one::<String>(
            "SELECT pg_catalog.current_database()::text",
            &[],
            "set_capture",
        )
        .unwrap_or_default();
        Spi::run(&format!(
            "ALTER DATABASE {} {setting}",
            nudge_core::sql::ident(&db)
        ))
        .unwrap_or_else(|e| error!("set_capture: {e}"));
        let now = format!(
            "new sessions capture {mode} (nudge.deferred_capture = {}, the database default)",
            if deferred { "on" } else { "off" }
        );
        match left {
            Some(l) => format!("{now}; {l}"),
            None => now,
        }
    })
}

/// How this session's inserts into sources are captured: `wal`, `leaving
/// wal` (the triggers capture again; the slot is still being read up to the
/// switch), `deferred` or `immediate`.
#[pg_extern]
fn capture_mode() -> String {
    as_extension(crate::engine::wal::mode)
        .map(str::to_string)
        .unwrap_or_else(|| {
            if crate::settings::DEFERRED_CAPTURE.get() {
                "deferred"
            } else {
                "immediate"
            }
            .to_string()
        })
}

#[pg_extern]
fn run_due(
    as_of: default!(TimestampWithTimeZone, "now()"),
    max_messages: default!(i32, 1000),
) -> i32 {
    if max_messages < 0 {
        invalid(format!("run_due: max_messages must not be negative"));
    }
    as_extension(|| {
        if Spi::connect(crate::citus::placement) == crate::citus::Placement::Coordinator {
            // every node runs the pass on its own shards, its share of the
            // messages (docs/citus.md); the time goes as microseconds, which
            // no DateStyle reads differently
            return one::<i32>(
                concat!(
                    "SELECT coalesce(sum(r::int), 0)::int
                       FROM nudge._on_nodes(ARRAY(
                                SELECT format('SELECT nudge.run_due(",
                    crate::citus::at_micros!(),
                    ", %s)', $1, share)
                                  FROM unnest(nudge._node_shares($2)) share)) r"
                ),
                &[as_of.into_inner().into(), i64::from(max_messages).into()],
                "run_due on the nodes",
            )
            .unwrap_or(0);
        }
        // a node: its groups in turn, `max_messages` in all
        let mut written = 0;
        crate::citus::each_group(|| {
            let left = max_messages - written;
            if left > 0 {
                written += engine_pass(as_of, left).written;
            }
        });
        written
    })
}

/// An engine pass, as `run_due` and `run_due_report` run it (as the
/// extension's owner, whoever calls): events queued by deferred capture
/// first, as they may open or close journeys.
fn engine_pass(as_of: TimestampWithTimeZone, max_messages: i32) -> due::Pass {
    pending(i64::MAX);
    due::run_due(as_of, max_messages)
}

/// One node's (or a single server's) part of `nudge.claim`, as a JSON array
/// of outbox rows (src/claim.rs).
#[pg_extern]
fn _claim_here(
    batch: i32,
    lease: Interval,
    consumer: Option<&str>,
) -> SetOfIterator<'static, JsonB> {
    let consumer = consumer.map(str::to_owned);
    SetOfIterator::new(as_extension(|| {
        crate::claim::claim_here(batch, lease, consumer)
    }))
}

/// run_due with its account: how many due journeys it took and how each
/// ended, and how many are still due (a pass takes at most `max_messages`).
#[pg_extern]
fn run_due_report(
    as_of: default!(TimestampWithTimeZone, "now()"),
    max_messages: default!(i32, 1000),
) -> TableIterator<
    'static,
    (
        name!(taken, i64),
        name!(written, i64),
        name!(suppressed, i64),
        name!(exited, i64),
        name!(held_out, i64),
        name!(expired, i64),
        name!(failed, i64),
        name!(retrying, i64),
        name!(still_due, i64),
    ),
> {
    crate::citus::refuse_on_cluster("run_due_report (run_due does)");
    if max_messages < 0 {
        invalid(format!("run_due_report: max_messages must not be negative"));
    }
    let (p, still_due) = as_extension(|| {
        let p = engine_pass(as_of, max_messages);
        let still_due = one::<i64>(
            "SELECT count(*) FROM nudge.enrollments e
              WHERE e.state = 'waiting' AND e.due_at <= $1
                AND e.trigger IN (SELECT name FROM nudge.triggers WHERE status = 'active')",
            &[as_of.into()],
            "counting what is still due",
        )
        .unwrap_or(0);
        (p, still_due)
    });
    let w = |n: i32| i64::from(n);
    TableIterator::once((
        p.claimed as i64,
        w(p.written),
        w(p.suppressed),
        w(p.exited),
        w(p.held_out),
        w(p.expired),
        w(p.failed),
        w(p.retried),
        still_due,
    ))
}

/// The background worker's counters (since the server started) and the lag:
/// how long the oldest due enrollment of an active trigger has been waiting.
#[pg_extern]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(running, bool),
        name!(last_pass, Option<TimestampWithTimeZone>),
        name!(passes, i64),
        name!(messages, i64),
        name!(errors, i64),
        name!(lag, Option<Interval>),
        name!(queued, i64),
        name!(failed, i64),
        name!(retried, i64),
        name!(capture, String),
        name!(wal_lag_bytes, Option<i64>),
        name!(wal_lag, Option<Interval>),
    ),
> {
    let s = crate::worker::status();
    // two aggregates, no row: the mailer role reads them for nudge-gateway's
    // /metrics without a grant on the journeys themselves
    let (lag, queued, wal) = as_extension(|| {
        (
            one::<Interval>(
                "SELECT now() - min(e.due_at) FROM nudge.enrollments e
           JOIN nudge.triggers t ON t.name = e.trigger AND t.status = 'active'
          WHERE e.state = 'waiting' AND e.due_at <= now()",
                &[],
                "worker_status",
            ),
            // events deferred capture has queued and the worker has not enrolled yet
            one::<i64>(
                "SELECT count(*) FROM nudge.capture_queue",
                &[],
                "worker_status",
            )
            .unwrap_or_default(),
            crate::engine::wal::lag(),
        )
    });
    let (capture, wal_lag_bytes, wal_lag) = wal.unwrap_or_else(|| (capture_mode(), None, None));
    let last = s
        .last_pass_us
        .and_then(|us| TimestampWithTimeZone::try_from(us).ok());
    TableIterator::once((
        s.running,
        last,
        s.passes,
        s.messages,
        s.errors,
        lag,
        queued,
        s.failed,
        s.retried,
        capture,
        wal_lag_bytes,
        wal_lag,
    ))
}

/// Reads profiles from the user's own tables: `sql` uses `$1` for the user id
/// and returns `email` (and optionally `timezone`) plus any other columns.
/// NULL restores the built-in `nudge.profiles` table. The query becomes a
/// generated function owned by the caller (`user_sql`), so that it runs with
/// the privileges of whoever set it and no more.
#[pg_extern]
fn set_profile_query(sql: Option<&str>) {
    crate::citus::refuse_on_cluster("set_profile_query");
    if let Some(q) = sql {
        let q = q.trim().trim_end_matches(';').trim();
        let hint = "$1 is the user id, as text (write $1::int or compare with a text column)";
        let names = in_context_with_hint("set_profile_query: the query fails", Some(hint), || {
            Spi::connect(|c| {
                let cols = or_raise(
                    c.select(
                        &format!("SELECT * FROM ({q}) AS p LIMIT 0"),
                        None,
                        &[Option::<String>::None.into()],
                    ),
                    "set_profile_query: the query fails",
                );
                (1..=cols.columns().unwrap_or(0))
                    .filter_map(|i| cols.column_name(i).ok())
                    .collect::<Vec<String>>()
            })
        });
        if !names.iter().any(|n| n == "email") {
            invalid(format!(
                "set_profile_query: the query must return a column named email (it returns: {})",
                names.join(", ")
            ));
        }
    }
    let definer = user_sql::Definer::current();
    // the profile query is its definer's: another admin replacing it could
    // send every trigger's messages (and what definers' queries put in them)
    // wherever it liked
    let owner = pinned(|| {
        one::<bool>(
            "SELECT bool_and(r.oid IS NOT NULL AND pg_catalog.pg_has_role(r.oid, 'USAGE'))
               FROM nudge.user_sql u LEFT JOIN pg_catalog.pg_roles r ON r.rolname = u.owner
              WHERE u.trigger = '' AND u.version = 0 AND u.part = 'profile'",
            &[],
            "set_profile_query",
        )
    });
    if owner == Some(false) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "set_profile_query: permission denied: the profile query belongs to another role"
        );
    }
    as_extension(|| {
        Spi::connect_mut(|c| {
            user_sql::forget_profile(c);
            if let Some(q) = sql {
                user_sql::create(c, user_sql::PROFILE, q, user_sql::Kind::Profile, &definer);
            }
        })
    });
}

/// What `user_id` would get from `trigger` now: its latest enrollment's anchor
/// event (or an empty one), its profile, the current template (of `step`, by
/// name, for a journey of several; the first by default).
#[pg_extern]
fn preview(
    trigger: &str,
    user_id: &str,
    step: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(recipient, String),
        name!(subject, String),
        name!(html, String),
        name!(text_body, Option<String>),
    ),
> {
    let msg = pinned(|| {
        Spi::connect(|c| {
            let t = catalog::live_triggers(c)
                .triggers
                .iter()
                .find(|l| l.trigger.name == trigger)
                .unwrap_or_else(|| invalid(format!("preview: no trigger named {trigger:?}")))
                .trigger
                .clone();
            // what a definer's queries return is theirs: preview shows it only to
            // a role that could run them itself (as the outbox's policy does)
            let foreign = or_raise(
            c.select(
                "SELECT string_agg(DISTINCT u.owner::text, ', ') FROM nudge.user_sql u
                   JOIN pg_catalog.pg_roles r ON r.rolname = u.owner
                  WHERE u.trigger = $1 AND u.version = $2 AND NOT pg_catalog.pg_has_role($3, r.oid, 'USAGE')",
                None,
                &[trigger.into(), t.version.into(), crate::privilege::current_role().into()],
            ),
            "preview",
        )
        .first()
        .get_one::<String>()
        .ok()
        .flatten();
            if let Some(owners) = foreign {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!(
                        "preview: permission denied: trigger {trigger:?} reads data of {owners}"
                    )
                );
            }
            let anchor = or_raise(
            c.select(
                "SELECT anchor FROM nudge.enrollments WHERE trigger = $1 AND user_id = $2 ORDER BY entered_at DESC LIMIT 1",
                None,
                &[trigger.into(), user_id.into()],
            ),
            "preview",
        )
        .first()
        .get::<JsonB>(1)
        .ok()
        .flatten()
        .map_or(serde_json::json!({}), |j| j.0);
            let profiles = due::profiles_of(c, vec![user_id.to_owned()]);
            let k = match step {
                None => 0,
                Some(name) => t
                    .steps
                    .iter()
                    .position(|s| s.name == name)
                    .unwrap_or_else(|| {
                        let names: Vec<&str> = t.steps.iter().map(|s| s.name.as_str()).collect();
                        invalid(format!(
                        "preview: trigger {trigger:?} has no step named {name:?} (its steps: {})",
                        names.join(", ")
                    ))
                    }),
            };
            let template = t.step_template(k, None).to_owned();
            let tpls = catalog::templates(
                c,
                std::iter::once(template.clone())
                    .chain(t.fallback_template.clone())
                    .collect(),
            );
            let answers = due::answers_for(c, vec![(&t, vec![user_id.to_owned()])]);
            let suppressed = due::suppressions(c, vec![user_id.to_owned()], &profiles);
            let consent = due::consent_of(c, vec![user_id.to_owned()]);
            let answer = answers
                .get(&(
                    t.name.clone(),
                    nudge_core::definition::AUDIENCE_SQL.to_string(),
                ))
                .and_then(|a| a.get(user_id));
            // the same checks as run_due, but for the journey's own (exit, expiry)
            let facts = nudge_core::decision::Facts {
                due_at: 0,
                now: 0,
                exit: None,
                retry: None,
                profile: due::profile_fact(profiles.get(user_id)),
                audience_sql: due::audience_sql_fact(&t, answer),
                suppressions: &suppressed,
                consent: &consent,
            };
            let (profile, recipient) = nudge_core::decision::screen(&t, user_id, &facts)
                .unwrap_or_else(|s| {
                    error!(
                        "preview: this user would get no message (rule {}): {}",
                        s.rule, s.why
                    )
                });
            let (context, context_error) = due::context_of(&t, user_id, &answers);
            let settings = due::settings(c);
            match compose::compose(
                due::loaded(&tpls, &template),
                t.fallback_template
                    .as_deref()
                    .map(|f| due::loaded(&tpls, f)),
                compose::Inputs {
                    trigger,
                    user_id,
                    message_key: "preview",
                    anchor: &anchor,
                    profile,
                    recipient,
                    context,
                    context_error,
                    // a preview carries no working link: it would unsubscribe
                    unsubscribe_url: (!t.transactional)
                        .then(|| settings.unsubscribe_url.clone())
                        .flatten()
                        .map(|u| nudge_core::consent::unsubscribe_url(&u, "preview")),
                    // the links a message would carry, under no key: they track nothing
                    links: settings
                        .tracking_base()
                        .filter(|_| t.track.any())
                        .map(|base| compose::Links {
                            base,
                            secret: b"preview",
                            track: t.track,
                        }),
                },
            ) {
                compose::Composed::Message { message, .. } => message,
                compose::Composed::Stopped(s) => error!("preview: (rule {}) {}", s.rule, s.why),
            }
        })
    });
    TableIterator::once((
        msg.recipient,
        msg.rendered.subject,
        msg.rendered.html,
        msg.rendered.text,
    ))
}

/// Sets database-wide policies; keys given replace the current ones, a key
/// set to null goes back to its default. Returns the settings now in force.
/// `{"caps": [{"max": 1, "per": "16 hours"}], "arbitration_window": "10 minutes",
///   "default_timezone": "America/New_York"}`
#[pg_extern]
fn configure(settings: JsonB) -> JsonB {
    let Some(given) = settings.0.as_object() else {
        invalid(format!("configure: expected a JSON object with keys caps, arbitration_window, default_timezone"));
    };
    let current = pinned(|| {
        one::<JsonB>(
            "SELECT coalesce(jsonb_object_agg(name, value), '{}') FROM nudge.settings",
            &[],
            "configure",
        )
    })
    .map_or(serde_json::json!({}), |j| j.0);
    let mut merged = current.as_object().cloned().unwrap_or_default();
    for (k, v) in given {
        if v.is_null() {
            merged.remove(k);
        } else {
            merged.insert(k.clone(), v.clone());
        }
    }
    let merged = serde_json::Value::Object(merged);
    if let Err(e) = nudge_core::policy::Settings::parse(&merged) {
        invalid(format!("configure: {e}"));
    }
    pinned(|| {
        Spi::connect_mut(|c| {
            or_raise(
                c.update("DELETE FROM nudge.settings", None, &[]),
                "configure",
            );
            or_raise(
            c.update(
                "INSERT INTO nudge.settings (name, value) SELECT key, value FROM jsonb_each($1)",
                None,
                &[JsonB(merged.clone()).into()],
            ),
            "configure",
        );
        })
    });
    JsonB(merged)
}

/// A duration as pg_nudge reads it (`wait`, `within`, caps), as an interval,
/// so that SQL (trigger_stats) and Rust use one parser.
#[pg_extern(immutable, parallel_safe)]
fn _duration(text: &str) -> Interval {
    let us = nudge_core::time::parse_duration(text).unwrap_or_else(|e| error!("{e}"));
    Interval::from_micros(us)
}

/// An arm's conversion against the holdout's: difference of rates, its 95%
/// interval and the two-sided p-value (no row when either side is empty).
#[pg_extern(immutable, parallel_safe)]
fn _uplift(
    converted: i64,
    exposed: i64,
    holdout_converted: i64,
    holdout_exposed: i64,
) -> TableIterator<
    'static,
    (
        name!(uplift, f64),
        name!(ci_low, f64),
        name!(ci_high, f64),
        name!(p_value, f64),
    ),
> {
    let u = nudge_core::experiment::uplift(
        converted.max(0) as u64,
        exposed.max(0) as u64,
        holdout_converted.max(0) as u64,
        holdout_exposed.max(0) as u64,
    );
    TableIterator::new(
        u.into_iter()
            .map(|u| (u.diff, u.ci_low, u.ci_high, u.p_value)),
    )
}

/// What `definition` would have done over the events of [from_ts, to_ts),
/// without writing anything: per step and outcome, how many journeys (or
/// entries) and up to five sample users. `trigger_name` draws experiment arms as the live
/// trigger of that name does (unless the definition names its `experiment`).
#[pg_extern]
fn backtest(
    definition: JsonB,
    from_ts: TimestampWithTimeZone,
    to_ts: TimestampWithTimeZone,
    trigger_name: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(outcome, String),
        name!(journeys, i64),
        name!(sample_users, Vec<String>),
        name!(step, String),
    ),
> {
    let here = || {
        pinned(|| crate::engine::backtest::backtest(&definition.0, from_ts, to_ts, trigger_name))
    };
    let parts = if Spi::connect(crate::citus::placement) == crate::citus::Placement::Coordinator {
        // every node replays its own users (as the extension's owner, who may
        // run the fan-out; a cluster runs no definer's SQL)
        as_extension(|| {
            Spi::connect(|c| {
                or_raise(
                    c.select(
                        concat!(
                            "SELECT r FROM nudge._on_nodes(ARRAY(
                                 SELECT format('SELECT coalesce(jsonb_agg(jsonb_build_array(b.outcome, b.journeys, b.sample_users, b.step)), ''[]'')
                                                  FROM nudge.backtest(%L::jsonb, ",
                            crate::citus::at_micros!(),
                            ", ",
                            crate::citus::at_micros!(),
                            ", %L) b', $1::text, $2, $3, $4)
                                   FROM nudge._nodes())) r"
                        ),
                        None,
                        &[
                            JsonB(definition.0.clone()).into(),
                            from_ts.into_inner().into(),
                            to_ts.into_inner().into(),
                            trigger_name.into(),
                        ],
                    ),
                    "backtest on the nodes",
                )
                .filter_map(|r| r.get::<String>(1).ok().flatten())
                .map(|text| {
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| error!("pg_nudge: backtest: a node's rows: {e}"))
                })
                .collect()
            })
        })
    } else {
        // a single server is one group; a node's groups add up
        crate::citus::each_group(here)
    };
    TableIterator::new(merged(&definition.0, trigger_name, parts))
}

/// Backtests of a cluster's groups or nodes as one, in the definition's
/// order of steps.
fn merged(
    definition: &serde_json::Value,
    trigger_name: Option<&str>,
    parts: Vec<Vec<nudge_core::backtest::Outcome>>,
) -> Vec<nudge_core::backtest::Outcome> {
    let steps: Vec<String> = Definition::parse(definition)
        .and_then(|d| d.compile(trigger_name.unwrap_or("backtest"), 0))
        .map(|t| t.steps.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    nudge_core::backtest::merge_outcomes(parts, &steps, crate::engine::backtest::SAMPLES)
}

/// Checks the experiments that optimize and records the winners found (the
/// worker does this every minute). Returns the new allocations.
#[pg_extern]
fn evaluate_experiments() -> TableIterator<'static, (name!(trigger, String), name!(winner, String))>
{
    TableIterator::new(pinned(|| Spi::connect_mut(crate::experiments::evaluate)))
}
