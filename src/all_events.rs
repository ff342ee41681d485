//! The events of every source, as (user_id, event, occurred_at, props): the
//! union of one branch per registered source, built from `nudge.sources` and
//! spliced into the statements that read history (capture, run_due's exit
//! re-check, backtest) in place of `nudge.all_events`. No object of ours
//! depends on a user's table, so dropping a source, its schema or a column
//! never reaches into the extension (docs/security.md, "Event sources"), and
//! the planner still pushes each statement's conditions into every branch.
//! `nudge.all_events`, the view users query, reads them through
//! `nudge._all_events()`.

use crate::spi_util::or_raise;
use nudge_core::sql::SourceMap;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::rc::Rc;

/// What a statement names where it reads the events of every source.
pub const TOKEN: &str = "nudge.all_events";

thread_local! {
    /// The sources as this backend last read them, grouped by owner; dropped
    /// by the relcache callback of `catalog` when nudge.sources changes.
    static GROUPS: RefCell<Option<Rc<Vec<Group>>>> = const { RefCell::new(None) };
    /// The source tables the groups were built from: a change to any of them
    /// (new owner, new name, a rule) drops the groups too.
    static TABLES: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Whether `relid` is one of the source tables the groups were built from.
pub fn is_source(relid: pg_sys::Oid) -> bool {
    TABLES.with(|t| t.borrow().contains(&relid))
}

/// The sources one role owns, as one parenthesized subquery:
/// `(SELECT … FROM source1 r UNION ALL …)`.
pub struct Group {
    pub owner: pg_sys::Oid,
    pub union: String,
}

pub fn invalidate() {
    GROUPS.with(|u| u.borrow_mut().take());
}

/// The registered sources, one group per owner. Privileged code reads each
/// group as its owner (`spi_util::run_per_owner`): planning a read of a table
/// runs code its owner attached to it (index expressions, CHECK constraints,
/// statistics), which must never run with more rights than that owner's.
pub fn groups(c: &SpiClient<'_>) -> Rc<Vec<Group>> {
    if let Some(g) = GROUPS.with(|g| g.borrow().clone()) {
        return g;
    }
    crate::catalog::listen(c);
    // each table schema-qualified whatever the search path: on a Citus node
    // the names are replaced by the shards' (src/citus.rs)
    let rows = or_raise(
        c.select(
            "SELECT k.relowner, quote_ident(n.nspname) || '.' || quote_ident(k.relname), s.user_column, s.event_column, s.time_column,
                    s.props_column, s.event_name, k.oid
               FROM nudge.sources s JOIN pg_catalog.pg_class k ON k.oid = s.source::oid
               JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
              WHERE k.relkind IN ('r', 'p') AND k.relpersistence <> 't'
              ORDER BY k.relowner, s.source::oid",
            None,
            &[],
        ),
        "reading sources",
    );
    let mut groups: Vec<(pg_sys::Oid, Vec<String>)> = vec![];
    let mut tables = vec![];
    for r in rows {
        tables.extend(r.get::<pg_sys::Oid>(8).ok().flatten());
        let owner = r
            .get::<pg_sys::Oid>(1)
            .ok()
            .flatten()
            .unwrap_or(pg_sys::InvalidOid);
        let s = |i| r.get::<String>(i).ok().flatten();
        let map = SourceMap {
            user_column: s(3).unwrap_or_default(),
            event_column: s(4),
            time_column: s(5),
            props_column: s(6),
            event_name: s(7),
        };
        let branch = format!(
            "SELECT {} FROM {} r",
            map.projection("r"),
            s(2).unwrap_or_default()
        );
        match groups.last_mut() {
            Some((o, branches)) if *o == owner => branches.push(branch),
            _ => groups.push((owner, vec![branch])),
        }
    }
    let g = Rc::new(
        groups
            .into_iter()
            .map(|(owner, branches)| Group {
                owner,
                union: format!("({})", branches.join("\nUNION ALL\n")),
            })
            .collect::<Vec<_>>(),
    );
    GROUPS.with(|c| *c.borrow_mut() = Some(g.clone()));
    TABLES.with(|t| *t.borrow_mut() = tables);
    g
}

/// Every source in one subquery: what `nudge._events_sql()` shows.
pub fn union(c: &SpiClient<'_>) -> String {
    let groups = groups(c);
    if groups.is_empty() {
        return "(SELECT NULL::text AS user_id, NULL::text AS event, NULL::timestamptz AS occurred_at, \
                 NULL::jsonb AS props WHERE false)"
            .into();
    }
    let all: Vec<&str> = groups
        .iter()
        .map(|g| &g.union[1..g.union.len() - 1])
        .collect();
    format!("({})", all.join("\nUNION ALL\n"))
}

/// The query `nudge.all_events` stands for, for people who want to see what
/// pg_nudge reads.
#[pg_extern(stable)]
fn _events_sql() -> String {
    crate::privilege::pinned(|| Spi::connect(|c| union(c)))
}

/// The rows of `nudge.all_events`: every source's events (of these names;
/// NULL: all), each source read as its owner. Collected in memory: the view
/// is for looking, and trigger_stats asks only for goal events.
#[pg_extern(stable)]
fn _all_events(
    events: default!(Option<Vec<String>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(user_id, Option<String>),
        name!(event, Option<String>),
        name!(occurred_at, Option<TimestampWithTimeZone>),
        name!(props, Option<pgrx::JsonB>),
    ),
> {
    let mut out = vec![];
    crate::privilege::as_extension(|| {
        Spi::connect(|c| {
            crate::spi_util::run_per_owner(
                &c,
                "SELECT e.user_id, e.event, e.occurred_at, e.props FROM nudge.all_events e
                  WHERE $1::text[] IS NULL OR e.event = ANY ($1)",
                &[events.clone().into()],
                "reading all_events",
                |rows| {
                    for r in rows {
                        out.push((
                            r.get::<String>(1).ok().flatten(),
                            r.get::<String>(2).ok().flatten(),
                            r.get::<TimestampWithTimeZone>(3).ok().flatten(),
                            r.get::<pgrx::JsonB>(4).ok().flatten(),
                        ));
                    }
                },
            )
        })
    });
    TableIterator::new(out)
}
