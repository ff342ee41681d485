//! Changes as events: a source registered with `nudge.watch_changes(table,
//! columns)` emits `<column>_changed` when an UPDATE changes one of those
//! columns (plan changed, trial extended), so that a state table needs no
//! hand-written events. A row trigger (`UPDATE OF` the columns, `WHEN` one
//! of them is distinct) queues the events in `nudge.capture_queue`, with
//! plain heap inserts as deferred capture does; a statement trigger enrolls
//! them before the statement ends (immediate capture) or leaves them to the
//! worker (deferred and WAL capture). Like capture, it runs as the updating
//! role and switches to the extension only for our own statements.

use crate::engine::deferred::{capture_pending, jsonb_in, Queue};
use crate::engine::source_row::row_json_text;
use crate::privilege::as_extension;
use crate::spi_util::ts;
use pgrx::prelude::*;
use serde_json::{Map, Value};

use nudge_core::definition::changed_event as event_name;

/// One updated row: `args[0]` is the source's user column.
pub unsafe fn capture_row(td: &pg_sys::TriggerData, args: &[String]) {
    let Some(user_column) = args.first() else {
        error!("pg_nudge: the change trigger needs the user column");
    };
    let catalog = crate::catalog::cached()
        .unwrap_or_else(|| as_extension(|| Spi::connect(|c| crate::catalog::live_triggers(c))));
    let rel = td.tg_relation;
    let desc = (*rel).rd_att;
    let json = |tuple: pg_sys::HeapTuple| -> Value {
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        serde_json::from_str(&row_json_text(datum)).unwrap_or(Value::Null)
    };
    let (old, new) = (json(td.tg_trigtuple), json(td.tg_newtuple));
    let user = match new.get(user_column.as_str()) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return,
    };
    // the trigger's UPDATE OF columns, by their names now
    let trigger = td.tg_trigger;
    let attnums = std::slice::from_raw_parts((*trigger).tgattr, (*trigger).tgnattr as usize);
    let changed: Vec<String> = attnums
        .iter()
        .filter_map(|n| {
            let att = (*desc)
                .attrs
                .as_slice((*desc).natts as usize)
                .get(*n as usize - 1)?;
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            (old.get(&name) != new.get(&name)).then_some(name)
        })
        .collect();
    let watched: Vec<&String> = changed
        .iter()
        .filter(|c| catalog.watched.contains(&event_name(c)))
        .collect();
    if watched.is_empty() {
        return;
    }
    let previous: Map<String, Value> = changed
        .iter()
        .map(|c| (c.clone(), old.get(c).cloned().unwrap_or(Value::Null)))
        .collect();
    let mut props = match new {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    props.insert("previous".into(), Value::Object(previous));
    let props = jsonb_in(&Value::Object(props).to_string());
    // the statement's time: two UPDATEs of one transaction are two changes
    let at = ts(pg_sys::GetCurrentStatementStartTimestamp());
    let mut q = Queue::open();
    for column in watched {
        q.push(&user, &event_name(column), at, props);
    }
    q.close();
}

/// After the UPDATE statement: its changes enrolled now, unless capture is
/// deferred (then the worker takes the queue). In WAL capture too: the slot
/// carries inserts only, and event time orders a change enrolled before the
/// inserts the worker has still to read.
pub fn statement_done() {
    if crate::settings::DEFERRED_CAPTURE.get() {
        return;
    }
    as_extension(|| capture_pending(i64::MAX));
}
