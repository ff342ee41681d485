//! The capture trigger of every source, in Rust: reads the statement's
//! transition table straight from its tuplestore, keeps the rows whose event
//! some trigger watches, and hands them to `capture`. No SQL runs when a
//! statement has no watched event; none runs to read the rows either (a
//! plpgsql trigger that aggregated the transition table cost a single-row
//! INSERT more than the whole capture of a watched event does now).
//!
//! The trigger's arguments map the table's columns (see `sources`):
//! user column, event column, time column, props column, fixed event name;
//! '' for one not given. Values are converted the way the casts of
//! `nudge.all_events` convert them (`::text`, `::timestamptz`, `::jsonb`,
//! `to_jsonb(row)`), so that capture and the send-time re-check agree.

use crate::engine::capture::{capture, Batch};
use crate::privilege::as_extension;
use crate::spi_util::ts;
use pgrx::prelude::*;
use pgrx::{JsonB, PgTupleDesc};
use serde_json::Value;
use std::ffi::CStr;

/// One mapped column: its number and how its values become what capture reads.
struct Column {
    attnum: usize,
    type_oid: pg_sys::Oid,
    output: pg_sys::Oid,
}

impl Column {
    unsafe fn find(desc: pg_sys::TupleDesc, table: &str, role: &str, name: &str) -> Option<Column> {
        if name.is_empty() {
            return None;
        }
        let tupdesc = PgTupleDesc::from_pg_unchecked(desc);
        let Some((i, att)) = tupdesc
            .iter()
            .enumerate()
            .find(|(_, a)| !a.is_dropped() && a.name() == name)
        else {
            error!("pg_nudge: capture on {table}: {role} {name:?} is no longer a column (nudge.drop_source and add_source it again)")
        };
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo(att.type_oid().value(), &mut output, &mut varlena);
        Some(Column {
            attnum: i,
            type_oid: att.type_oid().value(),
            output,
        })
    }

    /// The value as text (`::text`), or None for NULL.
    unsafe fn text(&self, values: &[pg_sys::Datum], nulls: &[bool]) -> Option<String> {
        if nulls[self.attnum] {
            return None;
        }
        let d = values[self.attnum];
        if self.type_oid == pg_sys::TEXTOID || self.type_oid == pg_sys::VARCHAROID {
            return String::from_datum(d, false);
        }
        let s = pg_sys::OidOutputFunctionCall(self.output, d);
        let out = CStr::from_ptr(s).to_string_lossy().into_owned();
        pg_sys::pfree(s.cast());
        Some(out)
    }
}

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
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let Some(user) = Column::find(desc, &table, "user_column", arg(0)) else {
        error!("pg_nudge: capture on {table}: no user column given");
    };
    let event = Column::find(desc, &table, "event_column", arg(1));
    let time = Column::find(desc, &table, "time_column", arg(2));
    let props = Column::find(desc, &table, "props_column", arg(3));
    let fixed_event = Some(arg(4).to_string()).filter(|e| !e.is_empty());
    if let Some(e) = &fixed_event {
        if !catalog.watched.contains(e) {
            return;
        }
    }
    let natts = (*desc).natts;
    let now = ts(pg_sys::GetCurrentTransactionStartTimestamp());
    // deferred: rows go straight into the queue, props as jsonb datums (never
    // parsed here); immediate: into the batch that capture reads
    let mut queue = crate::settings::DEFERRED_CAPTURE
        .get()
        .then(|| crate::engine::deferred::Queue::open());

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
    while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
        pg_sys::slot_getsomeattrs_int(slot, natts);
        let values = std::slice::from_raw_parts((*slot).tts_values, natts as usize);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts as usize);
        let name = match (&fixed_event, &event) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(col)) => col.text(values, nulls),
            (None, None) => None,
        };
        let Some(name) = name.filter(|n| catalog.watched.contains(n)) else {
            continue;
        };
        let Some(user_id) = user.text(values, nulls) else {
            continue;
        };
        let at = match &time {
            None => Some(now),
            Some(col) => timestamptz(col, values, nulls),
        };
        if let Some(q) = queue.as_mut() {
            let Some(at) = at else { continue };
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
                None => crate::engine::deferred::jsonb_in(&row_json_text(slot)),
            };
            q.push(&user_id, &name, at, p);
            continue;
        }
        let p = match &props {
            Some(col) => json_of(col, values, nulls, &table),
            None => row_json(slot),
        };
        batch.users.push(Some(user_id));
        batch.events.push(Some(name));
        batch.times.push(at);
        batch.props.push(Some(JsonB(p)));
    }
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    if let Some(q) = queue {
        q.close();
    } else if !batch.users.is_empty() {
        as_extension(|| capture(batch));
    }
}

unsafe fn timestamptz(
    col: &Column,
    values: &[pg_sys::Datum],
    nulls: &[bool],
) -> Option<TimestampWithTimeZone> {
    if nulls[col.attnum] {
        return None;
    }
    if col.type_oid == pg_sys::TIMESTAMPTZOID {
        return TimestampWithTimeZone::from_datum(values[col.attnum], false);
    }
    // timestamp, date, text...: through text, as the ::timestamptz cast reads them
    let text = col.text(values, nulls)?;
    let c = std::ffi::CString::new(text).ok()?;
    let d = pg_sys::OidInputFunctionCall(
        pg_sys::Oid::from(pg_sys::F_TIMESTAMPTZ_IN),
        c.as_ptr() as *mut _,
        pg_sys::TIMESTAMPTZOID,
        -1,
    );
    TimestampWithTimeZone::from_datum(d, false)
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
    serde_json::from_str(&row_json_text(slot)).unwrap_or(Value::Null)
}

/// The whole row as JSON text (row_to_json).
unsafe fn row_json_text(slot: *mut pg_sys::TupleTableSlot) -> String {
    let row = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
    let json = pg_sys::OidFunctionCall1Coll(
        pg_sys::Oid::from(pg_sys::F_ROW_TO_JSON_RECORD),
        pg_sys::InvalidOid,
        row,
    );
    String::from_datum(json, false).unwrap_or_default()
}
