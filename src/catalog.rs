//! Reads trigger definitions and templates. The compiled triggers are kept
//! per backend until nudge.triggers changes: a statement trigger on that
//! table sends a relcache invalidation, which every backend (this one at its
//! next command, others at their next transaction) turns into a re-read.
//! Capture runs on every inserting statement, and reading and parsing the
//! definitions each time cost more than the capture itself.

use crate::spi_util::run;
use nudge_core::definition::{Definition, Trigger};
use nudge_core::render::Template;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

pub struct LiveTrigger {
    pub trigger: Trigger,
    pub active: bool,
}

/// Every trigger's current version, compiled, and the event names they watch.
pub struct Catalog {
    pub triggers: Vec<LiveTrigger>,
    pub watched: HashSet<String>,
    /// The schema has the `rule` columns of 0.6.0. Capture goes on between
    /// installing a new library and `ALTER EXTENSION pg_nudge UPDATE`, and
    /// must not make the application's INSERT fail against the old schema.
    pub rule_columns: bool,
    /// The schema has `enrollments.step` of 0.9.0 (same reason).
    pub step_column: bool,
}

thread_local! {
    static CACHED: RefCell<Option<Rc<Catalog>>> = const { RefCell::new(None) };
    static TRIGGERS_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static VERSIONS_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static SOURCES_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static JOURNAL_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static LISTENING: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // InvalidOid: the whole relcache is being reset
    if relid == pg_sys::InvalidOid
        || relid == TRIGGERS_RELID.with(Cell::get)
        || relid == VERSIONS_RELID.with(Cell::get)
        || relid == JOURNAL_RELID.with(Cell::get)
    {
        CACHED.with(|c| c.borrow_mut().take());
    }
    if relid == pg_sys::InvalidOid
        || relid == SOURCES_RELID.with(Cell::get)
        || crate::all_events::is_source(relid)
    {
        crate::all_events::invalidate();
        crate::citus::forget_groups();
    }
}

/// Tells every backend to re-read the triggers or the sources (called by the
/// statement triggers on nudge.triggers, trigger_versions and sources, so
/// hand edits count too).
pub fn invalidate(relid: pg_sys::Oid) {
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    // on a Citus node the trigger fires on the table's local copy (a shard)
    // while backends listen for the table itself
    if let Some(table) = crate::citus::table_of_shard(relid) {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
    CACHED.with(|c| c.borrow_mut().take());
    crate::all_events::invalidate();
}

fn relid(c: &SpiClient<'_>, table: &str) -> pg_sys::Oid {
    run(
        c,
        "SELECT $1::regclass::oid",
        &[table.into()],
        "finding our tables",
    )
    .first()
    .get::<pg_sys::Oid>(1)
    .ok()
    .flatten()
    .unwrap_or(pg_sys::InvalidOid)
}

/// Registers this backend for the invalidations of our catalog tables (once)
/// and learns their oids (again after a rebuild: the extension may have been
/// created anew since).
pub fn listen(c: &SpiClient<'_>) {
    if !LISTENING.with(Cell::get) {
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(on_relcache_invalidation),
                pg_sys::Datum::from(0),
            )
        };
        LISTENING.with(|l| l.set(true));
    }
    TRIGGERS_RELID.with(|r| r.set(relid(c, "nudge.triggers")));
    VERSIONS_RELID.with(|r| r.set(relid(c, "nudge.trigger_versions")));
    SOURCES_RELID.with(|r| r.set(relid(c, "nudge.sources")));
    JOURNAL_RELID.with(|r| r.set(relid(c, "nudge.journal")));
}

/// The current version of every trigger (active or paused).
/// The compiled triggers when this backend holds them (no SQL needed).
pub fn cached() -> Option<Rc<Catalog>> {
    CACHED.with(|k| k.borrow().clone())
}

pub fn live_triggers(c: &SpiClient<'_>) -> Rc<Catalog> {
    if let Some(cached) = cached() {
        return cached;
    }
    listen(c);
    let rows = run(
        c,
        "SELECT t.name, t.version, t.status = 'active', v.definition
           FROM nudge.triggers t
           JOIN nudge.trigger_versions v ON v.trigger = t.name AND v.version = t.version
          ORDER BY t.name",
        &[],
        "reading triggers",
    );
    let mut triggers = Vec::new();
    for row in rows {
        let name: String = row.get(1).ok().flatten().unwrap_or_default();
        let version: i32 = row.get(2).ok().flatten().unwrap_or_default();
        let active: bool = row.get(3).ok().flatten().unwrap_or(false);
        let def: Option<JsonB> = row.get(4).ok().flatten();
        // Definitions are validated when defined; one that no longer compiles
        // (an older build's format) is skipped, never allowed to stop the rest.
        match def
            .ok_or("no definition".to_string())
            .and_then(|d| compile(&name, version, &d.0))
        {
            Ok(trigger) => triggers.push(LiveTrigger { trigger, active }),
            Err(e) => warning!("pg_nudge: trigger {name} v{version} skipped: {e}"),
        }
    }
    let watched = triggers
        .iter()
        // paused triggers too: their waiting journeys still exit
        .flat_map(|l| l.trigger.watched_events().map(str::to_owned))
        .collect();
    let has = |table: &str, column: &str| {
        run(
            c,
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid = $1::regclass AND attname = $2 AND NOT attisdropped)",
            &[table.into(), column.into()],
            "reading the schema",
        )
        .first()
        .get::<bool>(1)
        .ok()
        .flatten()
        .unwrap_or(false)
    };
    let rule_columns = has("nudge.journal", "rule");
    let step_column = has("nudge.enrollments", "step");
    let catalog = Rc::new(Catalog {
        triggers,
        watched,
        rule_columns,
        step_column,
    });
    CACHED.with(|k| *k.borrow_mut() = Some(catalog.clone()));
    catalog
}

pub fn compile(name: &str, version: i32, def: &serde_json::Value) -> Result<Trigger, String> {
    Definition::parse(def)?.compile(name, version)
}

/// The named templates, parsed. A template that fails to parse is reported
/// per name so that only the messages using it fail.
pub fn templates(
    c: &SpiClient<'_>,
    names: Vec<String>,
) -> HashMap<String, Result<Template, String>> {
    let rows = run(
        c,
        "SELECT name, subject, html, text_body FROM nudge.templates WHERE name = ANY($1)",
        &[names.into()],
        "reading templates",
    );
    let mut out = HashMap::new();
    for row in rows {
        let name: String = row.get(1).ok().flatten().unwrap_or_default();
        let subject: String = row.get(2).ok().flatten().unwrap_or_default();
        let html: String = row.get(3).ok().flatten().unwrap_or_default();
        let text: Option<String> = row.get(4).ok().flatten();
        out.insert(name, Template::parse(&subject, &html, text.as_deref()));
    }
    out
}
