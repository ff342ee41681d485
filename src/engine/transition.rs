//! The capture trigger of every source, in Rust: reads the statement's
//! transition table straight from its tuplestore, keeps the rows whose event
//! some trigger watches, and hands them to `capture`. No SQL runs when a
//! statement has no watched event; none runs to read the rows either (a
//! plpgsql trigger that aggregated the transition table cost a single-row
//! INSERT more than the whole capture of a watched event does now).
//!
//! The trigger's arguments map the table's columns; `source_row` reads them.

use crate::engine::capture::{capture, Batch};
use crate::engine::source_row::{row_json_text, Column, Mapping};
use crate::privilege::as_extension;
use crate::spi_util::ts;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::ffi::CStr;

/// Events of one statement immediate capture holds; past it, the statement's
/// events go through the queue.
const STATEMENT_CHUNK: usize = 50_000;

pub unsafe fn capture_statement(td: &pg_sys::TriggerData, args: &[String]) {
    let store = td.tg_newtable;
    if store.is_null() {
        error!("pg_nudge: the capture trigger needs REFERENCING NEW TABLE");
    }
    // a statement of a warm backend runs no SQL here: no SPI, no search_path
    let catalog = crate::catalog::cached()
        .unwrap_or_else(|| as_extension(|| Spi::connect(|c| crate::catalog::live_triggers(c))));
    if catalog.watched.is_empty() {
        return;
    }
    let rel = td.tg_relation;
    let desc = (*rel).rd_att;
    let table = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
    let map = Mapping::resolve(desc, &table, args).unwrap_or_else(|e| error!("{e}"));
    if let Some(e) = &map.fixed_event {
        if !catalog.watched.contains(e) {
            return;
        }
    }
    let props = &map.props;
    let natts = (*desc).natts;
    let now = ts(pg_sys::GetCurrentTransactionStartTimestamp());
    // deferred: rows go straight into the queue, props as jsonb datums (never
    // parsed here); immediate: into the batch that capture reads
    let mut queue = crate::settings::DEFERRED_CAPTURE
        .get()
        .then(|| crate::engine::deferred::Queue::open());

    let mut spilled = false;
    let mut batch = Batch {
        users: vec![],
        events: vec![],
        times: vec![],
        props: vec![],
    };
    let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
    // our own read position, as a NamedTuplestoreScan takes one: other
    // triggers of the statement may read the same transition table
    let reader = pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
    pg_sys::tuplestore_select_read_pointer(store, reader);
    pg_sys::tuplestore_rescan(store);
    // what reading a row allocates (its values as text, its props as jsonb)
    // goes when the next row is read: a statement of ten million rows held it
    // all until the statement ended, and ran the server out of memory
    let outer = pg_sys::CurrentMemoryContext;
    let row_cx = pg_sys::AllocSetContextCreateInternal(
        outer,
        c"pg_nudge capture row".as_ptr(),
        0,
        8 * 1024,
        8 * 1024 * 1024,
    );
    while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
        // the tuple just read (from a spilled tuplestore, palloc'd now) is
        // the slot's to free at the next read: read it in the outer context
        pg_sys::MemoryContextReset(row_cx);
        pg_sys::MemoryContextSwitchTo(row_cx);
        'row: {
            pg_sys::slot_getsomeattrs_int(slot, natts);
            let values = std::slice::from_raw_parts((*slot).tts_values, natts as usize);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts as usize);
            let Some(name) = map
                .event_name(values, nulls)
                .filter(|n| catalog.watched.contains(n))
            else {
                break 'row;
            };
            let Some(user_id) = map.user.text(values, nulls) else {
                break 'row;
            };
            let at = map.time(values, nulls, now);
            if let Some(q) = queue.as_mut() {
                let Some(at) = at else { break 'row };
                let p = match &props {
                    Some(col) if nulls[col.attnum] => q.empty_props(),
                    Some(col) if col.type_oid == pg_sys::JSONBOID => pg_sys::Datum::from(
                        pg_sys::pg_detoast_datum_packed(values[col.attnum].cast_mut_ptr()),
                    ),
                    Some(col) => {
                        let text = col.text(values, nulls).unwrap_or_default();
                        crate::spi_util::in_context(
                            &format!("pg_nudge: capture on {table}: props_column"),
                            || crate::engine::deferred::jsonb_in(&text),
                        )
                    }
                    // row_to_json's output is JSON: no error to name
                    None => crate::engine::deferred::jsonb_in(&row_json_text(
                        pg_sys::ExecFetchSlotHeapTupleDatum(slot),
                    )),
                };
                q.push(&user_id, &name, at, p);
                break 'row;
            }
            let p = match &props {
                Some(col) => json_of(col, values, nulls, &table),
                None => row_json(slot),
            };
            batch.users.push(Some(user_id));
            batch.events.push(Some(name));
            batch.times.push(at);
            batch.props.push(Some(JsonB(p)));
            if batch.users.len() >= STATEMENT_CHUNK {
                // A statement of millions of rows, held whole, ran the server
                // out of memory. Past a chunk, its events go to the queue and
                // are enrolled from there before the statement ends, a part
                // of the users at a time (deferred::capture_pending).
                pg_sys::MemoryContextSwitchTo(outer);
                let mut q = crate::engine::deferred::Queue::open();
                for (((u, e), t), p) in batch
                    .users
                    .drain(..)
                    .zip(batch.events.drain(..))
                    .zip(batch.times.drain(..))
                    .zip(batch.props.drain(..))
                {
                    let (Some(u), Some(e), Some(t)) = (u, e, t) else {
                        continue;
                    };
                    let props = p.map_or_else(
                        || q.empty_props(),
                        |j| crate::engine::deferred::jsonb_in(&j.0.to_string()),
                    );
                    q.push(&u, &e, t, props);
                }
                queue = Some(q);
                spilled = true;
                pg_sys::MemoryContextSwitchTo(row_cx);
            }
        }
        pg_sys::MemoryContextSwitchTo(outer);
    }
    pg_sys::MemoryContextSwitchTo(outer);
    pg_sys::MemoryContextDelete(row_cx);
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    if let Some(q) = queue {
        q.close();
        if spilled {
            as_extension(|| crate::engine::deferred::capture_pending(i64::MAX));
        }
    } else if !batch.users.is_empty() {
        as_extension(|| capture(batch));
    }
}

unsafe fn json_of(col: &Column, values: &[pg_sys::Datum], nulls: &[bool], table: &str) -> Value {
    if nulls[col.attnum] {
        return Value::Object(Default::default());
    }
    if col.type_oid == pg_sys::JSONBOID {
        return JsonB::from_datum(values[col.attnum], false).map_or(Value::Null, |j| j.0);
    }
    let text = col.text(values, nulls).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_else(|e| {
        error!("pg_nudge: capture on {table}: props_column is not JSON ({e}): {text:.80}")
    })
}

/// The whole row as an object, as `to_jsonb(row)` gives it.
unsafe fn row_json(slot: *mut pg_sys::TupleTableSlot) -> Value {
    serde_json::from_str(&row_json_text(pg_sys::ExecFetchSlotHeapTupleDatum(slot)))
        .unwrap_or(Value::Null)
}
