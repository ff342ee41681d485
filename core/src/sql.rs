//! SQL text that the extension generates: identifier quoting and the capture
//! trigger function of an event source.

/// Quotes an identifier the way Postgres' quote_ident does, always.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal so that it reads the same whatever
/// standard_conforming_strings is: with a backslash in it, as an escape
/// string (E'...'), whose meaning that setting does not change. A plain
/// '...' with a backslash would read differently with the setting off, and
/// the quote after it could end the literal early (SQL injection).
pub fn literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// How a source table's rows become events.
#[derive(Debug, Clone)]
pub struct SourceMap {
    pub user_column: String,
    pub event_column: Option<String>,
    pub time_column: Option<String>,
    pub props_column: Option<String>,
    pub event_name: Option<String>,
}

impl SourceMap {
    pub fn check(&self) -> Result<(), String> {
        match (&self.event_column, &self.event_name) {
            (None, None) => Err("add_source: give event_column (a column naming the event) or event_name (one event for every row)".into()),
            (Some(_), Some(_)) => Err("add_source: give event_column or event_name, not both".into()),
            _ => Ok(()),
        }
    }

    /// A SELECT list over relation alias `r` yielding (user_id, event, occurred_at, props).
    pub fn projection(&self, r: &str) -> String {
        let col = |c: &str| format!("{r}.{}", ident(c));
        let event = match (&self.event_column, &self.event_name) {
            (Some(c), _) => format!("({})::text", col(c)),
            (None, Some(n)) => literal(n),
            (None, None) => "NULL::text".into(),
        };
        let time = self
            .time_column
            .as_deref()
            .map_or("now()".into(), |c| format!("({})::timestamptz", col(c)));
        let props = self
            .props_column
            .as_deref()
            .map_or(format!("to_jsonb({r})"), |c| {
                format!("coalesce(({})::jsonb, '{{}}')", col(c))
            });
        format!(
            "({})::text AS user_id, {event} AS event, {time} AS occurred_at, {props} AS props",
            col(&self.user_column)
        )
    }

    /// 0.1.0's capture trigger function, plpgsql, for a database whose SQL
    /// is still 0.1.0 under a newer library (until ALTER EXTENSION UPDATE):
    /// it reads the
    /// transition table once, keeps only events some trigger watches, and
    /// hands them to `nudge._capture` as four arrays in one call. SECURITY
    /// DEFINER: whoever may insert into the source may capture, without any
    /// privilege on pg_nudge's own tables.
    pub fn capture_function(&self, function: &str) -> String {
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $nudge$
DECLARE
  watched text[] := nudge._watched_events();
BEGIN
  IF cardinality(watched) = 0 THEN
    RETURN NULL;
  END IF;
  PERFORM nudge._capture(array_agg(s.user_id), array_agg(s.event), array_agg(s.occurred_at), array_agg(s.props))
    FROM (SELECT {proj} FROM nudge_new_rows n) s
   WHERE s.event = ANY (watched) AND s.user_id IS NOT NULL
  HAVING count(*) > 0;
  RETURN NULL;
END
$nudge$",
            proj = self.projection("n")
        )
    }

    /// The statement-level capture trigger: `nudge._capture_rows` (Rust)
    /// reads the transition table; its arguments are this mapping, '' for a
    /// part not given.
    pub fn capture_trigger(&self, table: &str) -> String {
        let arg = |a: &Option<String>| literal(a.as_deref().unwrap_or(""));
        format!(
            "CREATE TRIGGER nudge_capture AFTER INSERT ON {table}
 REFERENCING NEW TABLE AS nudge_new_rows
 FOR EACH STATEMENT EXECUTE FUNCTION nudge._capture_rows({}, {}, {}, {}, {})",
            literal(&self.user_column),
            arg(&self.event_column),
            arg(&self.time_column),
            arg(&self.props_column),
            arg(&self.event_name)
        )
    }
}

/// The search path a definer's generated function runs with: `pg_catalog`
/// first (so that a same-named function or operator in another schema never
/// stands in for a built-in one), then the path the definer had when defining
/// it, then `pg_temp` last, so that a temporary relation of whichever session
/// calls it can never shadow a name the definer meant (temporary objects are
/// searched first unless `pg_temp` is named). Every entry comes back quoted,
/// ready for `SET search_path = ...`: the text it came from is the caller's.
pub fn definer_search_path(current: &str) -> String {
    let mut kept: Vec<String> = vec![ident("pg_catalog")];
    kept.extend(
        split_path(current)
            .into_iter()
            .filter(|n| {
                !n.is_empty() && n != "pg_temp" && !n.starts_with("pg_temp_") && n != "pg_catalog"
            })
            .map(|n| ident(&n)),
    );
    kept.push(ident("pg_temp"));
    kept.join(", ")
}

/// The schema names of a search_path value, as PostgreSQL reads them:
/// entries split on commas outside double quotes, unquoted names folded to
/// lower case, `""` inside quotes a literal quote.
fn split_path(path: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (vec![], String::new(), false);
    let mut chars = path.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c if c.is_whitespace() && !quoted => {}
            c if quoted => cur.push(c),
            c => cur.extend(c.to_lowercase()),
        }
    }
    out.push(cur);
    out
}

/// `sql` with the qualified table name `from` replaced by `to` wherever it
/// stands alone: not inside a longer name (`nudge.events_x`, `x.nudge.events`)
/// nor a quoted one. Our statements write our tables as `nudge.<name>`; on a
/// Citus node they run on a shard group's tables (docs/citus.md).
pub fn replace_table_name(sql: &str, from: &str, to: &str) -> String {
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut last = 0;
    for (at, _) in sql.match_indices(from) {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + from.len()).copied();
        let alone = !before.is_some_and(|b| is_ident(b) || b == b'.' || b == b'"')
            && !after.is_some_and(|b| is_ident(b) || b == b'"');
        if alone {
            out.push_str(&sql[last..at]);
            out.push_str(to);
            last = at + from.len();
        }
    }
    out.push_str(&sql[last..]);
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_table_name_is_replaced_only_where_it_stands_alone() {
        let sql = "SELECT * FROM nudge.events e, nudge.events_seen, \"nudge.events\", x.nudge.events WHERE e.id IN (SELECT id FROM nudge.events)";
        assert_eq!(
            replace_table_name(sql, "nudge.events", "nudge.events_7"),
            "SELECT * FROM nudge.events_7 e, nudge.events_seen, \"nudge.events\", x.nudge.events WHERE e.id IN (SELECT id FROM nudge.events_7)"
        );
        assert_eq!(
            replace_table_name("INSERT INTO nudge.events(id)", "nudge.events", "t"),
            "INSERT INTO t(id)"
        );
    }
    use super::*;

    #[test]
    fn definer_path_puts_pg_catalog_first_and_pg_temp_last() {
        assert_eq!(
            definer_search_path("\"$user\", public"),
            "\"pg_catalog\", \"$user\", \"public\", \"pg_temp\""
        );
        assert_eq!(
            definer_search_path("pg_temp, App, pg_catalog"),
            "\"pg_catalog\", \"app\", \"pg_temp\""
        );
        assert_eq!(
            definer_search_path("PG_TEMP_3,app,\"pg_temp\""),
            "\"pg_catalog\", \"app\", \"pg_temp\""
        );
        assert_eq!(
            definer_search_path("\"a,b\", \"we\"\"ird\""),
            "\"pg_catalog\", \"a,b\", \"we\"\"ird\", \"pg_temp\""
        );
        // what the caller wrote cannot end the SET clause
        assert_eq!(
            definer_search_path("x$$;drop"),
            "\"pg_catalog\", \"x$$;drop\", \"pg_temp\""
        );
        assert_eq!(definer_search_path(""), "\"pg_catalog\", \"pg_temp\"");
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
        // with standard_conforming_strings off, '\'' would be a quote inside
        // the literal and the next one would end it
        assert_eq!(literal("p\\')--"), "E'p\\\\'')--'");
    }

    #[test]
    fn projection_uses_fixed_name_and_whole_row() {
        let m = SourceMap {
            user_column: "customer_id".into(),
            event_column: None,
            time_column: Some("created_at".into()),
            props_column: None,
            event_name: Some("purchased".into()),
        };
        m.check().unwrap();
        let p = m.projection("n");
        assert!(p.contains("'purchased' AS event"));
        assert!(p.contains("to_jsonb(n) AS props"));
        assert!(p.contains("(n.\"created_at\")::timestamptz"));
        let both = SourceMap {
            event_column: Some("kind".into()),
            ..m.clone()
        };
        assert!(both.check().is_err());
    }

    #[test]
    fn capture_trigger_passes_the_mapping_as_arguments() {
        let m = SourceMap {
            user_column: "customer's id".into(),
            event_column: None,
            time_column: Some("created_at".into()),
            props_column: None,
            event_name: Some("purchased".into()),
        };
        let sql = m.capture_trigger("app.orders");
        assert!(sql.contains("AFTER INSERT ON app.orders"));
        assert!(sql.contains("REFERENCING NEW TABLE AS nudge_new_rows"));
        // user, event column, time, props column, event name: '' for a part not given
        assert!(sql
            .ends_with("nudge._capture_rows('customer''s id', '', 'created_at', '', 'purchased')"));
    }
}
