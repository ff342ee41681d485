//! Changes as events: a source registered with `nudge.watch_changes(table,
//! columns)` emits `<column>_changed` when an UPDATE changes one of those
//! columns (plan changed, trial extended), so that a state table needs no
//! hand-written events. A row trigger (`UPDATE OF` the columns, `WHEN` the
//! binary images of one of them differ) collects the events of the
//! statement; a statement trigger writes them into `nudge.events` in one
//! INSERT, where they are captured as any event is (immediate, deferred or
//! WAL), kept in the history that exits at send time, repeated entries and
//! `backtest` read, and dumped with the database. A failure there is a
//! warning: the application's UPDATE goes on.

use crate::engine::source_row::{row_json_text, Column};
use crate::privilege::as_extension;
use crate::spi_util::{run, ts};
use nudge_core::definition::changed_event as event_name;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::ffi::CStr;

/// Events collected from the rows of the running statement, written by its
/// statement trigger (or, past this many rows or bytes of props, by the row
/// trigger at once).
const FLUSH_AT: usize = 10_000;
const FLUSH_BYTES: usize = 32 * 1024 * 1024;

struct Change {
    user: String,
    events: Vec<String>,
    at: i64,
    props: Value,
    /// The subtransaction the row changed in: its rollback takes the change back.
    subxact: pg_sys::SubTransactionId,
    bytes: usize,
}

thread_local! {
    static PENDING: RefCell<Vec<Change>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// A statement that fails after its row triggers ran leaves their events
/// behind: the end of the transaction drops what is left (a commit can only
/// leave any if a statement trigger did not fire, which `watch_changes`
/// prevents by refusing partitions and inheritance), so that no later
/// transaction writes them.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if [
        XACT_EVENT_ABORT,
        XACT_EVENT_PARALLEL_ABORT,
        XACT_EVENT_COMMIT,
        XACT_EVENT_PARALLEL_COMMIT,
        XACT_EVENT_PREPARE,
    ]
    .contains(&event)
    {
        PENDING.with(|p| p.borrow_mut().clear());
    }
}

/// A rolled-back savepoint takes back the changes made in it, and only those.
#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    mine: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        PENDING.with(|p| p.borrow_mut().retain(|c| c.subxact < mine));
    }
}

fn listen() {
    if !CALLBACKS.with(Cell::get) {
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        }
        CALLBACKS.with(|c| c.set(true));
    }
}

/// One updated row: `args[0]` is the source's user column.
pub unsafe fn capture_row(td: &pg_sys::TriggerData, args: &[String]) {
    let Some(user_column) = args.first() else {
        error!("pg_nudge: the change trigger needs the user column");
    };
    let catalog = crate::catalog::cached()
        .unwrap_or_else(|| as_extension(|| Spi::connect(|c| crate::catalog::live_triggers(c))));
    let rel = td.tg_relation;
    let desc = (*rel).rd_att;
    let table = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
    // the trigger's UPDATE OF columns, by their names now, that a trigger watches
    let trigger = td.tg_trigger;
    let attnums = std::slice::from_raw_parts((*trigger).tgattr, (*trigger).tgnattr as usize);
    let atts = (*desc).attrs.as_slice((*desc).natts as usize);
    let watched: Vec<String> = attnums
        .iter()
        .filter_map(|n| atts.get((*n as usize).checked_sub(1)?))
        .map(|a| {
            CStr::from_ptr(a.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| catalog.watched.contains(&event_name(name)))
        .collect();
    if watched.is_empty() {
        return;
    }
    // the user as the INSERT path reads it (the type's text output)
    let user = match Column::find(desc, &table, "user_column", user_column) {
        Ok(Some(col)) => {
            let n = (*desc).natts as usize;
            let (mut values, mut nulls) = (vec![pg_sys::Datum::from(0); n], vec![false; n]);
            pg_sys::heap_deform_tuple(
                td.tg_newtuple,
                desc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            col.text(&values, &nulls)
        }
        _ => None,
    };
    let Some(user) = user else { return };
    let json = |tuple: pg_sys::HeapTuple| -> Option<Value> {
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        serde_json::from_str(&row_json_text(datum)).ok()
    };
    let (Some(old), Some(new)) = (json(td.tg_trigtuple), json(td.tg_newtuple)) else {
        warning!("pg_nudge: a change of {table} was not read as JSON; no event for it");
        return;
    };
    let changed: Vec<&String> = watched
        .iter()
        .filter(|c| old.get(*c) != new.get(*c))
        .collect();
    if changed.is_empty() {
        return;
    }
    let previous: Map<String, Value> = changed
        .iter()
        .map(|c| ((*c).clone(), old.get(*c).cloned().unwrap_or(Value::Null)))
        .collect();
    let mut props = match new {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    props.insert("previous".into(), Value::Object(previous));
    let mut props = Value::Object(props);
    // jsonb refuses the NUL character that json keeps
    strip_nul(&mut props);
    // the transaction's time, as now() gives the events it inserts: an
    // order placed after the change in the same transaction is not before it
    let at = pg_sys::GetCurrentTransactionStartTimestamp();
    listen();
    let bytes = props.to_string().len();
    let subxact = pg_sys::GetCurrentSubTransactionId();
    let full = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.push(Change {
            user,
            events: changed.iter().map(|c| event_name(c)).collect(),
            at,
            props,
            subxact,
            bytes,
        });
        p.len() >= FLUSH_AT || p.iter().map(|c| c.bytes).sum::<usize>() >= FLUSH_BYTES
    });
    if full {
        flush();
    }
}

fn strip_nul(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', ""),
        Value::Array(a) => a.iter_mut().for_each(strip_nul),
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().filter(|k| k.contains('\0')).cloned().collect();
            for k in keys {
                if let Some(x) = m.remove(&k) {
                    m.insert(k.replace('\0', ""), x);
                }
            }
            m.values_mut().for_each(strip_nul);
        }
        _ => {}
    }
}

/// After the UPDATE statement: its changes into `nudge.events`, one INSERT.
pub fn statement_done() {
    flush();
}

fn flush() {
    // this statement's changes: a statement run inside another's trigger
    // (in a subtransaction of its own) leaves the outer one's for its end
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let pending: Vec<Change> = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let (mine, outer): (Vec<Change>, Vec<Change>) = std::mem::take(&mut *p)
            .into_iter()
            .partition(|c| c.subxact >= current);
        *p = outer;
        mine
    });
    if pending.is_empty() {
        return;
    }
    let (mut users, mut events, mut times, mut props) = (vec![], vec![], vec![], vec![]);
    for c in pending {
        for e in c.events {
            users.push(c.user.clone());
            events.push(e);
            times.push(ts(c.at));
            props.push(JsonB(c.props.clone()));
        }
    }
    let n = users.len();
    let written = as_extension(|| {
        crate::isolate::subtransaction(|| {
            Spi::connect_mut(|c| {
                run(
                    c,
                    "INSERT INTO nudge.events (user_id, event, occurred_at, props)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::jsonb[])",
                    &[users.into(), events.into(), times.into(), props.into()],
                    "writing changes as events",
                );
            })
        })
    });
    if let Err(e) = written {
        warning!("pg_nudge: {n} change events were not written: {e}");
    }
}
