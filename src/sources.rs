//! Event sources: tables whose inserts are events. Each gets a statement-level
//! AFTER INSERT trigger with a transition table, generated from its column
//! mapping, and a branch in the events that history reads see (`all_events`).
//! `nudge.events` is registered the same way at install.

use crate::privilege::{as_extension, check_source_rights, pinned};
use crate::spi_util::or_raise;
use nudge_core::sql::{ident, literal, SourceMap};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

fn function_name(oid: pg_sys::Oid) -> String {
    format!("nudge.{}", ident(&format!("_capture_{}", oid.to_u32())))
}

pub fn add(source: pg_sys::Oid, map: SourceMap) {
    if let Err(e) = map.check() {
        crate::spi_util::invalid(e);
    }
    // what the caller may do is checked as the caller; the rest is written
    // by the extension's owner, whom the catalog and the trigger belong to
    let table = pinned(|| Spi::connect(|c| table_name(c, source)));
    check_source_rights(source, &table, "add_source");
    let cluster = crate::citus::source_on_cluster(source, &table, &map.user_column);
    pinned(|| Spi::connect(|c| check_safe_to_read(c, source, &table)));
    as_extension(|| {
        Spi::connect_mut(|c| {
            for (what, col) in [
                ("user_column", Some(&map.user_column)),
                ("event_column", map.event_column.as_ref()),
                ("time_column", map.time_column.as_ref()),
                ("props_column", map.props_column.as_ref()),
            ] {
                if let Some(col) = col {
                    if !has_column(c, source, col) {
                        error!(
                            "add_source: {what}: table {table} has no column {}",
                            literal(col)
                        );
                    }
                }
            }
            let already = or_raise(
                c.select(
                    "SELECT 1 FROM nudge.sources WHERE source = $1",
                    None,
                    &[source.into()],
                ),
                "reading sources",
            )
            .len();
            if already > 0 {
                error!("add_source: {table} is already an event source (nudge.drop_source it first to change its mapping)");
            }
            or_raise(
            c.update(
                "INSERT INTO nudge.sources (source, user_column, event_column, time_column, props_column, event_name)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                None,
                &[
                    source.into(),
                    map.user_column.clone().into(),
                    map.event_column.clone().into(),
                    map.time_column.clone().into(),
                    map.props_column.clone().into(),
                    map.event_name.clone().into(),
                ],
            ),
            "registering the source",
        );
            let updated = flag(
                c,
                "SELECT to_regprocedure('nudge._capture_rows()') IS NOT NULL",
                &[],
                "finding the capture trigger function",
            );
            if updated {
                or_raise(
                    c.update(&map.capture_trigger(&table), None, &[]),
                    "creating the capture trigger",
                );
                in_wal_mode(c, source, &table);
                if cluster {
                    crate::citus::register_on_nodes(source);
                }
            } else {
                // the database's pg_nudge is still 0.1.0: its own kind of trigger
                let f = function_name(source);
                for (sql, doing) in [
                    (map.capture_function(&f), "creating the capture function"),
                    (
                        format!(
                            "CREATE TRIGGER nudge_capture AFTER INSERT ON {table}
                         REFERENCING NEW TABLE AS nudge_new_rows
                         FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
                        ),
                        "creating the capture trigger",
                    ),
                ] {
                    or_raise(c.update(&sql, None, &[]), doing);
                }
            }
        })
    })
}

/// In WAL capture the trigger stays off and the slot reads the table's
/// inserts from the moment it became a source: CREATE TRIGGER has waited for
/// the transactions inserting into it, so what committed before this
/// position was inserted before it was one.
fn in_wal_mode(c: &mut SpiClient<'_>, source: pg_sys::Oid, table: &str) {
    // under the lock set_capture holds while it switches the triggers: a
    // source added meanwhile is switched with the others or after them
    // (mode() reads no state from a database whose SQL is older)
    crate::engine::wal::lock(c);
    let wal = crate::engine::wal::mode() == Some("wal");
    if !wal {
        return;
    }
    let unlogged = flag(
        c,
        "SELECT relpersistence = 'u' FROM pg_catalog.pg_class WHERE oid = $1",
        &[source.into()],
        "checking the table",
    );
    if unlogged {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("add_source: {table} is unlogged, and this database captures from the WAL, to which an unlogged table writes nothing"),
            "ALTER TABLE ... SET LOGGED first"
        );
    }
    or_raise(
        c.update(
            &format!("ALTER TABLE {table} DISABLE TRIGGER nudge_capture"),
            None,
            &[],
        ),
        "switching the capture trigger off (WAL capture)",
    );
    or_raise(
        c.update(
            "UPDATE nudge.sources SET wal_from = pg_catalog.pg_current_wal_insert_lsn() WHERE source = $1",
            None,
            &[source.into()],
        ),
        "recording where WAL capture starts for the source",
    );
}

/// Refuses a table that privileged code could not read without running a
/// function some role wrote: a table of another kind than a plain or
/// partitioned one, or a column (or a field or element of one) whose type has
/// a user-defined cast to what sources are read as (text, timestamptz, json).
/// `nudge._guard_sources` refuses the DDL that would introduce one later.
fn check_safe_to_read(c: &SpiClient<'_>, source: pg_sys::Oid, table: &str) {
    let row = or_raise(
        c.select(
            "SELECT relkind::text, relpersistence = 't', relrowsecurity AND NOT pg_catalog.pg_has_role(relowner, 'USAGE')
               FROM pg_catalog.pg_class WHERE oid = $1",
            None,
            &[source.into()],
        ),
        "checking the table",
    );
    let row = row.first();
    let kind = row.get::<String>(1).ok().flatten().unwrap_or_default();
    if row.get::<bool>(2).ok().flatten().unwrap_or(false) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("add_source: {table} is a temporary table (other sessions cannot read it)")
        );
    }
    if row.get::<bool>(3).ok().flatten().unwrap_or(false) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("add_source: {table} has row-level security, and pg_nudge reads sources as their owner"),
            "only the table's owner may register it: its rows would be shared with every member of nudge_admin"
        );
    }
    if kind != "r" && kind != "p" {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("add_source: {table} is not a table (only tables and partitioned tables can be event sources)")
        );
    }
    // a database whose SQL is still older (until ALTER EXTENSION UPDATE) has
    // no check of its own: the upgrade adds it and its event trigger
    let checkable = flag(
        c,
        "SELECT to_regprocedure('nudge._source_hazards(regclass)') IS NOT NULL",
        &[],
        "checking the table's columns",
    );
    if !checkable {
        return;
    }
    let hazard = or_raise(
        c.select(
            "SELECT format('column %s of type %s has a user-defined cast %s', column_name, type, cast_function)
               FROM nudge._source_hazards($1) LIMIT 1",
            None,
            &[source.into()],
        ),
        "checking the table's columns",
    )
    .first()
    .get_one::<String>()
    .ok()
    .flatten();
    if let Some(h) = hazard {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("add_source: {table}: {h}"),
            "pg_nudge reads event sources with its own rights and never runs a function another role wrote there; drop the cast or map another table"
        );
    }
}

fn has_column(c: &SpiClient<'_>, source: pg_sys::Oid, col: &str) -> bool {
    flag(
        c,
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
        &[source.into(), col.into()],
        "checking columns",
    )
}

/// `nudge.watch_changes`: an UPDATE that changes one of `columns` of a
/// registered source emits `<column>_changed` (engine::changes). An empty
/// list stops watching.
pub fn watch_changes(source: pg_sys::Oid, columns: Vec<String>) {
    crate::citus::refuse_on_cluster("watch_changes");
    let table = pinned(|| Spi::connect(|c| table_name(c, source)));
    check_source_rights(source, &table, "watch_changes");
    as_extension(|| {
        Spi::connect_mut(|c| {
            let user: Option<String> = or_raise(
                c.select(
                    "SELECT user_column FROM nudge.sources WHERE source = $1",
                    None,
                    &[source.into()],
                ),
                "reading sources",
            )
            .first()
            .get(1)
            .ok()
            .flatten();
            let Some(user) = user else {
                crate::spi_util::invalid(format!(
                    "watch_changes: {table} is not an event source (nudge.add_source it first)"
                ));
            };
            // a statement trigger fires only on the table an UPDATE names:
            // not on a partitioned table's partitions, nor on an inheritance
            // child updated through its parent, whose row triggers would fire
            let reached_through_another = flag(
                c,
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = $1 AND relkind = 'p')
                     OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits WHERE inhrelid = $1 OR inhparent = $1)",
                &[source.into()],
                "checking the table",
            );
            if reached_through_another {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("watch_changes: {table} is partitioned, a partition, or in an inheritance tree"),
                    "watch a table that no UPDATE reaches through another one"
                );
            }
            let mut cols = columns.clone();
            cols.sort();
            cols.dedup();
            for col in &cols {
                if !has_column(c, source, col) {
                    crate::spi_util::invalid(format!(
                        "watch_changes: table {table} has no column {}",
                        literal(col)
                    ));
                }
            }
            drop_change_triggers(c, source, &table);
            or_raise(
                c.update(
                    "UPDATE nudge.sources SET changes = $2 WHERE source = $1",
                    None,
                    &[
                        source.into(),
                        (!cols.is_empty()).then(|| cols.clone()).into(),
                    ],
                ),
                "registering the watched columns",
            );
            if cols.is_empty() {
                return;
            }
            let list = cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
            // as text: a type without an equality (json, json[], a composite
            // holding one) compares too, and pg_dump writes the clause back as
            // it was (a binary-image comparison of ROW(...)::record lost its
            // cast in the dump, and the restore failed)
            let distinct = cols
                .iter()
                .map(|c| {
                    format!(
                        "OLD.{0}::pg_catalog.text IS DISTINCT FROM NEW.{0}::pg_catalog.text",
                        ident(c)
                    )
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            for (sql, doing) in [
                (
                    format!(
                        "CREATE TRIGGER nudge_changes AFTER UPDATE OF {list} ON {table} FOR EACH ROW
                         WHEN ({distinct}) EXECUTE FUNCTION nudge._capture_changes({})",
                        literal(&user)
                    ),
                    "creating the change trigger",
                ),
                (
                    format!(
                        "CREATE TRIGGER nudge_changes_done AFTER UPDATE OF {list} ON {table}
                         FOR EACH STATEMENT EXECUTE FUNCTION nudge._changes_done()"
                    ),
                    "creating the change trigger",
                ),
            ] {
                or_raise(c.update(&sql, None, &[]), doing);
            }
        })
    })
}

/// The triggers of `watch_changes`, where there are any (no notice for
/// the tables without).
fn drop_change_triggers(c: &mut SpiClient<'_>, source: pg_sys::Oid, table: &str) {
    let names: Vec<String> = or_raise(
        c.select(
            "SELECT tgname::text FROM pg_catalog.pg_trigger
              WHERE tgrelid = $1 AND tgname IN ('nudge_changes', 'nudge_changes_done')",
            None,
            &[source.into()],
        ),
        "reading the change triggers",
    )
    .filter_map(|r| r.get::<String>(1).ok().flatten())
    .collect();
    for t in names {
        or_raise(
            c.update(&format!("DROP TRIGGER {} ON {table}", ident(&t)), None, &[]),
            "dropping the change triggers",
        );
    }
}

pub fn drop(source: pg_sys::Oid) {
    let table = pinned(|| Spi::connect(|c| table_name(c, source)));
    check_source_rights(source, &table, "drop_source");
    as_extension(|| enroll_from_wal_before_drop(&table));
    as_extension(|| {
        Spi::connect_mut(|c| {
            let gone = or_raise(
                c.update(
                    "DELETE FROM nudge.sources WHERE source = $1 RETURNING 1",
                    None,
                    &[source.into()],
                ),
                "unregistering the source",
            )
            .len();
            if gone == 0 {
                error!("drop_source: {table} is not an event source");
            }
            or_raise(
                c.update(
                    &format!("DROP TRIGGER IF EXISTS nudge_capture ON {table}"),
                    None,
                    &[],
                ),
                "dropping the trigger",
            );
            drop_change_triggers(c, source, &table);
            // the nodes last: a node that no longer knows the source while its
            // shards' trigger is still there captures nothing there, and the
            // application's INSERT goes on (citus::Relation::Unregistered)
            if crate::citus::placement(c) == crate::citus::Placement::Coordinator {
                crate::citus::register_on_nodes(source);
            }
            // the per-source plpgsql function of a source added by 0.1.0
            let old = function_name(source) + "()";
            let exists = or_raise(
                c.select(
                    "SELECT 1 WHERE to_regprocedure($1) IS NOT NULL",
                    None,
                    &[old.clone().into()],
                ),
                "finding the 0.1.0 capture function",
            )
            .len();
            if exists > 0 {
                or_raise(
                    c.update(&format!("DROP FUNCTION {old}"), None, &[]),
                    "dropping the function",
                );
            }
        })
    })
}

/// In WAL capture, what the table's inserts committed before it stops being
/// a source are still its events: with no insert into it running (the lock),
/// the slot is read to its end before the source goes.
fn enroll_from_wal_before_drop(table: &str) {
    if crate::engine::wal::mode().is_some() {
        // the pass's lock first, as set_capture takes them
        Spi::connect(|c| crate::engine::wal::lock(c));
        or_raise(
            Spi::run(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")),
            "locking the table",
        );
        // an insert committed with synchronous_commit off may not be flushed
        // yet, and a pass reads up to what is
        unsafe { pg_sys::XLogFlush(pg_sys::GetXLogInsertRecPtr()) };
        crate::engine::wal::capture_from_wal(i64::from(i32::MAX));
    }
}

/// A SELECT's one boolean (false for no row or NULL).
fn flag(c: &SpiClient<'_>, sql: &str, args: &[pgrx::datum::DatumWithOid<'_>], doing: &str) -> bool {
    or_raise(c.select(sql, None, args), doing)
        .first()
        .get_one::<bool>()
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn table_name(c: &SpiClient<'_>, oid: pg_sys::Oid) -> String {
    or_raise(
        c.select("SELECT $1::regclass::text", None, &[oid.into()]),
        "naming the table",
    )
    .first()
    .get::<String>(1)
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("no table with oid {}", oid.to_u32()))
}
