//! pg_nudge on a Citus cluster (docs/citus.md): every node does the work of
//! the users whose shards it holds.
//!
//! `nudge.distribute()` distributes the per-user tables by user id, all
//! co-located with `nudge.events`: shard i of events, enrollments, journal,
//! outbox, ... covers the same users and lives on the same node. So one shard
//! group is a complete single-server pg_nudge for its users, and the engine
//! runs on it unchanged: its statements are run with our table names replaced
//! by the group's shard names (and the reference tables' local copies), which
//! makes them plain PostgreSQL statements on local tables. Citus's planner
//! never sees them, so nothing that Citus cannot distribute (FOR UPDATE SKIP
//! LOCKED, a transition table joined with our tables, INSERT ... SELECT with
//! identity keys) has to be.
//!
//! Where a group's statements run:
//! - capture: the trigger on an events shard (or a co-located source's
//!   shard), in the application's transaction, on the node of the shard;
//! - the worker of each node: its own groups, one after another;
//! - `run_due`, `claim` called on a node: its own groups; called on the
//!   coordinator: on every node that holds groups (`nudge._on_nodes`).

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// One shard group on this node: for each of our tables (and each source
/// registered on this node), the local table that holds its part.
#[derive(Debug, Default)]
pub struct Group {
    /// (qualified name as our statements write it, local shard's name)
    tables: Vec<(String, String)>,
    /// the first user-id hash of the group's range
    range: i64,
}

impl Group {
    /// `sql` with every whole qualified name of a group's table replaced by
    /// its shard's name. A name is replaced only where it stands alone
    /// (`nudge.events` but not `nudge.events_x` nor `x.nudge.events`).
    pub fn rewrite(&self, sql: &str) -> String {
        let mut out = sql.to_owned();
        for (from, to) in &self.tables {
            out = nudge_core::sql::replace_table_name(&out, from, to);
        }
        out
    }

    /// The local name of one of our tables (`capture_queue` → `capture_queue_102033`).
    pub fn table(&self, qualified: &str) -> Option<&str> {
        self.tables
            .iter()
            .find(|(f, _)| f == qualified)
            .map(|(_, t)| t.as_str())
    }
}

thread_local! {
    /// The shard group the current statements run on, if any.
    static CURRENT: RefCell<Option<Rc<Group>>> = const { RefCell::new(None) };
    /// How capture treats each table a capture trigger fired on.
    static OF_RELATION: RefCell<HashMap<pg_sys::Oid, Relation>> = RefCell::new(HashMap::new());
}

/// An advisory-lock class of ours for the current group. The statements of
/// one distributed transaction on several shards of a node run in backends of
/// their own: locks that two groups shared would make them wait for each
/// other, a deadlock that only the transaction's end could break. Groups hold
/// disjoint users, so each gets classes of its own (shifted by its range).
pub fn lock_class(class: i32) -> i32 {
    match current() {
        Some(g) => class.wrapping_add(g.range as i32),
        None => class,
    }
}

/// The group our statements run on now.
pub fn current() -> Option<Rc<Group>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Runs `f` with our statements on `group`'s shards. The previous group comes
/// back however `f` ends (an ERROR unwinds through here).
pub fn within<R>(group: Option<Rc<Group>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<Group>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), group));
    let _restore = Restore(prev);
    f()
}

/// Where this database stands: a single server (no Citus, or our tables not
/// distributed), the coordinator of a cluster, or a worker node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Single,
    Coordinator,
    Node,
}

pub fn placement(c: &SpiClient<'_>) -> Placement {
    // without Citus no SQL at all (a catalog cache lookup: claim and run_due
    // ask on every call); nor of a schema older than the library (between
    // installing it and ALTER EXTENSION UPDATE), which has no _placement
    let citus = unsafe {
        pg_sys::get_relname_relid(
            c"pg_dist_partition".as_ptr(),
            pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
        ) != pg_sys::InvalidOid
    };
    let ours = citus
        && c.select(
            "SELECT to_regprocedure('nudge._placement()') IS NOT NULL",
            None,
            &[],
        )
        .ok()
        .and_then(|r| r.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false);
    if !ours {
        return Placement::Single;
    }
    let p: Option<String> = c
        .select("SELECT nudge._placement()", None, &[])
        .ok()
        .and_then(|r| r.first().get_one::<String>().ok().flatten());
    match p.as_deref() {
        Some("coordinator") => Placement::Coordinator,
        Some("node") => Placement::Node,
        _ => Placement::Single,
    }
}

/// The shard groups that this node holds, in hash-range order.
pub fn local_groups(c: &SpiClient<'_>) -> Vec<Rc<Group>> {
    // dynamic: pg_dist_* exist only where Citus is installed
    let rows = c
        .select(
            "SELECT t, shard, range FROM nudge._local_shards()",
            None,
            &[],
        )
        .unwrap_or_else(|e| error!("pg_nudge: reading this node's shards: {e}"));
    let mut reference = Vec::new();
    let mut by_range: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for r in rows {
        let table: String = r.get(1).ok().flatten().unwrap_or_default();
        let shard: String = r.get(2).ok().flatten().unwrap_or_default();
        match r.get::<i64>(3).ok().flatten() {
            Some(range) => by_range.entry(range).or_default().push((table, shard)),
            None => reference.push((table, shard)),
        }
    }
    by_range
        .into_iter()
        .map(|(range, mut tables)| {
            tables.extend(reference.iter().cloned());
            Rc::new(Group { tables, range })
        })
        .collect()
}

/// This node's groups, or None when our tables are not distributed (the
/// database is the one group); a coordinator holds no group of its own
/// unless it was given shards.
pub fn groups_here() -> Option<Vec<Rc<Group>>> {
    Spi::connect(|c| match placement(c) {
        Placement::Single => None,
        _ => Some(local_groups(c)),
    })
}

/// Runs `f` on each of this node's groups in turn, or once on a database
/// whose tables are not distributed.
pub fn each_group<R>(mut f: impl FnMut() -> R) -> Vec<R> {
    match groups_here() {
        None => vec![f()],
        Some(groups) => groups
            .into_iter()
            .map(|g| within(Some(g), &mut f))
            .collect(),
    }
}

/// SQL for a time sent to the nodes as microseconds since 2000 (`%s` in a
/// format() string), which no DateStyle reads differently.
macro_rules! at_micros {
    () => {
        "timestamptz ''2000-01-01 00:00:00+00'' + %s * interval ''1 microsecond''"
    };
}
pub(crate) use at_micros;

/// Where the table a capture trigger fired on stands.
#[derive(Clone)]
pub enum Relation {
    /// a table of a single server (or not a shard): capture as it is
    Plain,
    /// a shard of a source of this node: capture on its group
    Shard(Rc<Group>),
    /// a table of a cluster that is no registered source's shard here (a
    /// drop_source half done, shards moved to a node before nudge.distribute()
    /// registered the sources there): nothing can be captured here, and the
    /// application's INSERT must go on
    Unregistered,
}

/// What capture does on the table a trigger fired on. A shard's name ends in
/// `_<shard id>`; no other name costs a query. Kept per backend: a shard's
/// group never changes while the shard exists (`forget_groups` when this
/// node's sources change).
pub fn relation(relid: pg_sys::Oid, relname: &str) -> Relation {
    let Some((_, suffix)) = relname.rsplit_once('_') else {
        return Relation::Plain;
    };
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return Relation::Plain;
    }
    if let Some(known) = OF_RELATION.with(|m| m.borrow().get(&relid).cloned()) {
        return known;
    }
    let found = crate::privilege::as_extension(|| {
        Spi::connect(|c| {
            if placement(c) == Placement::Single {
                return Relation::Plain;
            }
            let range: Option<i64> = c
                .select("SELECT nudge._shard_range($1)", None, &[relid.into()])
                .ok()
                .and_then(|r| r.first().get_one::<i64>().ok().flatten());
            let Some(range) = range else {
                return Relation::Unregistered;
            };
            local_groups(c)
                .into_iter()
                .find(|g| g.range == range)
                .map_or(Relation::Unregistered, Relation::Shard)
        })
    });
    OF_RELATION.with(|m| m.borrow_mut().insert(relid, found.clone()));
    found
}

/// Our table that a shard (`nudge.triggers_102008`) is a part of: the table
/// of the same name without the shard id, in schema nudge.
pub fn table_of_shard(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        if name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(name).to_str().ok()?.to_owned();
        let (table, suffix) = name.rsplit_once('_')?;
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let nsp = pg_sys::get_namespace_oid(c"nudge".as_ptr(), true);
        let table = std::ffi::CString::new(table).ok()?;
        let oid = pg_sys::get_relname_relid(table.as_ptr(), nsp);
        (oid != pg_sys::InvalidOid && oid != relid).then_some(oid)
    }
}

/// Refuses (SQLSTATE 0A000) what does not run on a cluster yet.
pub fn refuse_on_cluster(what: &str) {
    if Spi::connect(placement) != Placement::Single {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{what} does not run on a Citus cluster yet"),
            "docs/citus.md, \"Not on a cluster yet\""
        );
    }
}

/// Whether a source being added is one of a cluster's (checked on the
/// coordinator: a table distributed by its user column, co-located with
/// nudge.events). Refused (0A000) on a worker node, or when it is not so
/// distributed: its rows would be captured nowhere near their users' data.
pub fn source_on_cluster(source: pg_sys::Oid, table: &str, user_column: &str) -> bool {
    let (placement, colocated) = crate::privilege::as_extension(|| {
        Spi::connect(|c| {
            let p = placement(c);
            let ok = p == Placement::Coordinator
                && c.select(
                    "SELECT nudge._colocated_source($1::oid::regclass, $2)",
                    None,
                    &[source.into(), user_column.into()],
                )
                .ok()
                .and_then(|r| r.first().get_one::<bool>().ok().flatten())
                .unwrap_or(false);
            (p, ok)
        })
    });
    let refuse = |why: String, hint: &str| -> bool {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            why,
            hint
        );
        #[allow(unreachable_code)]
        false
    };
    match placement {
        Placement::Single => false,
        Placement::Node => refuse(
            format!("add_source({table}): this is a worker node"),
            "run it on the coordinator (docs/citus.md)",
        ),
        Placement::Coordinator if !colocated => refuse(
            format!("add_source({table}): on a cluster a source must be distributed by its user column {user_column}, co-located with nudge.events"),
            "SELECT create_distributed_table(table, user column, colocate_with => 'nudge.events') first (docs/citus.md)",
        ),
        Placement::Coordinator => true,
    }
}

/// Registers a source on every other node as this one has it now, or
/// unregisters it there once it is no source here (`nudge._sources_to_nodes`).
pub fn register_on_nodes(source: pg_sys::Oid) {
    Spi::connect_mut(|c| {
        if let Err(e) = c.update(
            "SELECT nudge._sources_to_nodes($1::oid::regclass)",
            None,
            &[source.into()],
        ) {
            error!("pg_nudge: registering the source on the nodes: {e}");
        }
    });
}

/// Forgets the groups of the relations capture fired on: the sources of
/// this node changed, and a group names every source's shard.
pub fn forget_groups() {
    OF_RELATION.with(|m| m.borrow_mut().clear());
}
