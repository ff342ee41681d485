//! The events of every source, as (user_id, event, occurred_at, props): the
//! union of one branch per registered source, built from `nudge.sources` and
//! spliced into the statements that read history (capture, run_due's exit
//! re-check, backtest) in place of `nudge.all_events`. No object of ours
//! depends on a user's table, so dropping a source, its schema or a column
//! never reaches into the extension (docs/security.md, "Event sources"), and
//! the planner still pushes each statement's conditions into every branch.
//! `nudge.all_events`, the view users query, reads the same text through
//! `nudge._events_sql()`.

use crate::spi_util::or_raise;
use nudge_core::sql::SourceMap;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::rc::Rc;

/// What a statement names where it reads the events of every source.
pub const TOKEN: &str = "nudge.all_events";

thread_local! {
    /// The union for the sources as this backend last read them; dropped by
    /// the relcache callback of `catalog` when nudge.sources changes.
    static UNION: RefCell<Option<Rc<String>>> = const { RefCell::new(None) };
}

pub fn invalidate() {
    UNION.with(|u| u.borrow_mut().take());
}

/// `(SELECT … FROM source1 r UNION ALL …)`, a parenthesized subquery.
pub fn union(c: &SpiClient<'_>) -> Rc<String> {
    if let Some(u) = UNION.with(|u| u.borrow().clone()) {
        return u;
    }
    crate::catalog::listen(c);
    let rows = or_raise(
        c.select(
            "SELECT source::regclass::text, user_column, event_column, time_column, props_column, event_name
               FROM nudge.sources WHERE to_regclass(source::oid::regclass::text) IS NOT NULL
              ORDER BY source::oid",
            None,
            &[],
        ),
        "reading sources",
    );
    let mut branches = vec![];
    for r in rows {
        let s = |i| r.get::<String>(i).ok().flatten();
        let map = SourceMap {
            user_column: s(2).unwrap_or_default(),
            event_column: s(3),
            time_column: s(4),
            props_column: s(5),
            event_name: s(6),
        };
        branches.push(format!(
            "SELECT {} FROM {} r",
            map.projection("r"),
            s(1).unwrap_or_default()
        ));
    }
    if branches.is_empty() {
        branches.push(
            "SELECT NULL::text AS user_id, NULL::text AS event, NULL::timestamptz AS occurred_at, NULL::jsonb AS props WHERE false"
                .into(),
        );
    }
    let u = Rc::new(format!("({})", branches.join("\nUNION ALL\n")));
    UNION.with(|c| *c.borrow_mut() = Some(u.clone()));
    u
}

/// `sql` with the union in place of `nudge.all_events` (each use names an alias).
pub fn expand(c: &SpiClient<'_>, sql: &str) -> String {
    sql.replace(TOKEN, &union(c))
}

/// The union's text, for `nudge.all_events` (the view) and for people who
/// want to see what pg_nudge reads.
#[pg_extern(stable)]
fn _events_sql() -> String {
    crate::privilege::pinned(|| Spi::connect(|c| union(c).to_string()))
}
