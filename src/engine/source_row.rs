//! How a row of an event source becomes an event: which columns hold the
//! user, the event name, the time and the props, and how their values are
//! read. The capture trigger (reading a statement's transition table) and the
//! WAL output plugin (reading decoded inserts) both use it, so that the three
//! capture modes read a row the same way.
//!
//! Values are converted the way the casts of `nudge.all_events` convert them
//! (`::text`, `::timestamptz`, `::jsonb`, `to_jsonb(row)`), so that capture
//! and the send-time re-check agree.

use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::ffi::CStr;

/// One mapped column: its number and how its values become what capture reads.
pub struct Column {
    pub attnum: usize,
    pub type_oid: pg_sys::Oid,
    output: pg_sys::Oid,
}

impl Column {
    pub(crate) unsafe fn find(
        desc: pg_sys::TupleDesc,
        table: &str,
        role: &str,
        name: &str,
    ) -> Result<Option<Column>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        let tupdesc = PgTupleDesc::from_pg_unchecked(desc);
        let Some((i, att)) = tupdesc
            .iter()
            .enumerate()
            .find(|(_, a)| !a.is_dropped() && a.name() == name)
        else {
            return Err(format!("pg_nudge: capture on {table}: {role} {name:?} is no longer a column (nudge.drop_source and add_source it again)"));
        };
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo(att.type_oid().value(), &mut output, &mut varlena);
        Ok(Some(Column {
            attnum: i,
            type_oid: att.type_oid().value(),
            output,
        }))
    }

    /// The value as text (`::text`), or None for NULL.
    pub unsafe fn text(&self, values: &[pg_sys::Datum], nulls: &[bool]) -> Option<String> {
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

/// A source's mapping resolved against the table's columns as they are now.
/// The five arguments are those of the capture trigger (see `sources`):
/// user column, event column, time column, props column, fixed event name;
/// '' for one not given.
pub struct Mapping {
    pub user: Column,
    pub event: Option<Column>,
    pub time: Option<Column>,
    pub props: Option<Column>,
    pub fixed_event: Option<String>,
}

impl Mapping {
    pub unsafe fn resolve(
        desc: pg_sys::TupleDesc,
        table: &str,
        args: &[String],
    ) -> Result<Mapping, String> {
        let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
        let Some(user) = Column::find(desc, table, "user_column", arg(0))? else {
            return Err(format!(
                "pg_nudge: capture on {table}: no user column given"
            ));
        };
        Ok(Mapping {
            user,
            event: Column::find(desc, table, "event_column", arg(1))?,
            time: Column::find(desc, table, "time_column", arg(2))?,
            props: Column::find(desc, table, "props_column", arg(3))?,
            fixed_event: Some(arg(4).to_string()).filter(|e| !e.is_empty()),
        })
    }

    /// The row's event name, if it has one.
    pub unsafe fn event_name(&self, values: &[pg_sys::Datum], nulls: &[bool]) -> Option<String> {
        match (&self.fixed_event, &self.event) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(col)) => col.text(values, nulls),
            (None, None) => None,
        }
    }

    /// The event's time: the time column read as `::timestamptz` reads it, or
    /// `now` for a source without one (NULL for a NULL time).
    pub unsafe fn time(
        &self,
        values: &[pg_sys::Datum],
        nulls: &[bool],
        now: TimestampWithTimeZone,
    ) -> Option<TimestampWithTimeZone> {
        let Some(col) = &self.time else {
            return Some(now);
        };
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
}

/// A whole row (a composite datum) as JSON text, as row_to_json gives it.
pub unsafe fn row_json_text(row: pg_sys::Datum) -> String {
    let json = pg_sys::OidFunctionCall1Coll(
        pg_sys::Oid::from(pg_sys::F_ROW_TO_JSON_RECORD),
        pg_sys::InvalidOid,
        row,
    );
    String::from_datum(json, false).unwrap_or_default()
}
