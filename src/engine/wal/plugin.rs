//! pg_nudge's logical decoding output plugin (the slot is created with plugin
//! `pg_nudge`, this library). It writes one line for each insert into a
//! registered source whose event some trigger watches, read with the same
//! mapping as the capture trigger (`source_row`), and nothing for anything
//! else. The pass that reads the slot tells it, in its options, the sources,
//! the watched events and the window of commits to take (`nudge_core::wal`).
//!
//! It runs inside `pg_logical_slot_peek_changes`, in the worker's (or
//! capture_pending's) transaction. An ERROR here would abort that pass and
//! every pass after it, on the same row: a row it cannot read becomes a line
//! that says why, and capture goes on with the next one.

use crate::engine::source_row::{row_json_text, Mapping};
use nudge_core::wal::{captured_line, unreadable_line, Lsn, PluginOptions};
use pgrx::prelude::*;
use std::collections::HashSet;
use std::ffi::CStr;

struct State {
    options: PluginOptions,
    watched: HashSet<String>,
    /// reset after each change: what reading a row allocates goes with it
    context: pg_sys::MemoryContext,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    (*cb).startup_cb = Some(startup);
    (*cb).begin_cb = Some(begin);
    (*cb).change_cb = Some(change);
    (*cb).commit_cb = Some(commit);
    (*cb).shutdown_cb = Some(shutdown);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opts: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    (*opts).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
    let mut options = PluginOptions::default();
    let list = (*ctx).output_plugin_options;
    if !list.is_null() {
        for i in 0..(*list).length {
            let def = (*(*list).elements.add(i as usize)).ptr_value as *mut pg_sys::DefElem;
            let name = CStr::from_ptr((*def).defname).to_string_lossy();
            let value = CStr::from_ptr(pg_sys::defGetString(def)).to_string_lossy();
            if name == "pass" {
                options = serde_json::from_str(&value).unwrap_or_else(|e| {
                    error!("pg_nudge output plugin: option \"pass\" is not what a capture pass sends: {e}")
                });
            }
        }
    }
    let context = pg_sys::AllocSetContextCreateInternal(
        (*ctx).context,
        c"pg_nudge output plugin".as_ptr(),
        0,
        8 * 1024,
        8 * 1024 * 1024,
    );
    let watched = options.watched.iter().cloned().collect();
    let state = Box::into_raw(Box::new(State {
        options,
        watched,
        context,
    }));
    (*ctx).output_plugin_private = state.cast();
    // freed with the decoding context, which an ERROR also frees (the
    // shutdown callback is not called then)
    let cb = pg_sys::MemoryContextAlloc(
        (*ctx).context,
        std::mem::size_of::<pg_sys::MemoryContextCallback>(),
    ) as *mut pg_sys::MemoryContextCallback;
    (*cb).func = Some(free_state);
    (*cb).arg = state.cast();
    pg_sys::MemoryContextRegisterResetCallback((*ctx).context, cb);
}

unsafe extern "C-unwind" fn free_state(arg: *mut std::ffi::c_void) {
    drop(Box::from_raw(arg as *mut State));
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    (*ctx).output_plugin_private = std::ptr::null_mut();
}

// decoding requires begin and commit callbacks; a line per insert is enough
#[pg_guard]
unsafe extern "C-unwind" fn begin(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _lsn: pg_sys::XLogRecPtr,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // a source's UPDATE and DELETE are not events
    if (*change).action != pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT {
        return;
    }
    let state = &*((*ctx).output_plugin_private as *const State);
    let Some(source) = state.options.sources.get(&(*relation).rd_id.to_u32()) else {
        return;
    };
    let (commit, end) = (Lsn((*txn).final_lsn), Lsn((*txn).end_lsn));
    if !state.options.window().admits(commit, Lsn(source.from)) {
        return;
    }
    let newtuple = (*change).data.tp.newtuple;
    if newtuple.is_null() {
        return;
    }
    let old = pg_sys::MemoryContextSwitchTo(state.context);
    let committed_at = (*txn).xact_time.commit_time;
    let line = PgTryBuilder::new(|| {
        read_insert(
            state,
            relation,
            &mut (*newtuple).tuple,
            &source.args,
            commit,
            end,
            committed_at,
        )
    })
    .catch_others(|e| {
        // a value that cannot be read (class 22, data exception) makes the
        // row unreadable; anything else (a cancel, out of memory) is the
        // pass's, and ends it
        let data_error = match &e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => {
                is_data_exception(r.sql_error_code() as i32)
            }
            _ => false,
        };
        if !data_error {
            e.rethrow();
        }
        let table = CStr::from_ptr((*(*relation).rd_rel).relname.data.as_ptr()).to_string_lossy();
        Some(unreadable_line(
            commit,
            end,
            &format!("{table}: {}", crate::spi_util::caught_message(e)),
        ))
    })
    .execute();
    if let Some(line) = line {
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        pg_sys::appendBinaryStringInfo((*ctx).out, line.as_ptr().cast(), line.len() as i32);
        pg_sys::OutputPluginWrite(ctx, true);
    }
    pg_sys::MemoryContextSwitchTo(old);
    pg_sys::MemoryContextReset(state.context);
}

/// SQLSTATE class 22 (data exception): PostgreSQL packs the five characters
/// six bits each, the class in the lowest twelve.
fn is_data_exception(code: i32) -> bool {
    let class = |c: u8| ((c - b'0') & 0x3F) as i32;
    code & 0xFFF == class(b'2') | (class(b'2') << 6)
}

/// The line of one inserted row, or None when it is not a watched event.
unsafe fn read_insert(
    state: &State,
    relation: pg_sys::Relation,
    tuple: &mut pg_sys::HeapTupleData,
    args: &[String],
    commit: Lsn,
    end: Lsn,
    committed_at: pg_sys::TimestampTz,
) -> Option<String> {
    let desc = (*relation).rd_att;
    let table = CStr::from_ptr((*(*relation).rd_rel).relname.data.as_ptr()).to_string_lossy();
    let map = match Mapping::resolve(desc, &table, args) {
        Ok(m) => m,
        Err(e) => return Some(unreadable_line(commit, end, &e)),
    };
    if map
        .fixed_event
        .as_ref()
        .is_some_and(|e| !state.watched.contains(e))
    {
        return None;
    }
    let natts = (*desc).natts as usize;
    let mut values = vec![pg_sys::Datum::from(0usize); natts];
    let mut nulls = vec![false; natts];
    pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
    let name = map
        .event_name(&values, &nulls)
        .filter(|n| state.watched.contains(n))?;
    let user = map.user.text(&values, &nulls)?;
    // a source without a time column: the moment the insert committed (the
    // trigger takes the inserting transaction's start, which the WAL lacks)
    let now = crate::spi_util::ts(committed_at);
    let at = map.time(&values, &nulls, now)?;
    let props = match &map.props {
        Some(col) if nulls[col.attnum] => "{}".to_string(),
        Some(col) if col.type_oid == pg_sys::JSONBOID || col.type_oid == pg_sys::JSONOID => {
            col.text(&values, &nulls).unwrap_or_default()
        }
        Some(col) => {
            let text = col.text(&values, &nulls).unwrap_or_default();
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                return Some(unreadable_line(
                    commit,
                    end,
                    &format!("{table}: props_column is not JSON ({e}): {text:.80}"),
                ));
            }
            text
        }
        None => row_json_text(pg_sys::heap_copy_tuple_as_datum(tuple, desc)),
    };
    // what capture stores is jsonb: JSON that jsonb refuses (a \u0000, a
    // number past numeric's range) must fail here, on its row, and not in
    // the pass that enrolls it (which would fail on it again and again)
    if !matches!(&map.props, Some(col) if col.type_oid == pg_sys::JSONBOID) {
        crate::engine::deferred::jsonb_in(&props);
    }
    let micros: i64 = at.into_inner();
    Some(captured_line(commit, end, &user, &name, micros, &props))
}
