//! WAL capture's bookkeeping, without a server: write-ahead log positions,
//! which decoded transactions a pass takes, where the next pass starts, and
//! the line the output plugin writes for each captured insert.
//!
//! A transaction is known by the position of its commit record. Decoding
//! hands transactions over in commit order, so one position says what has
//! been enrolled: every transaction that committed before it. See
//! docs/operations.md, "WAL capture".

use serde::{Deserialize, Serialize};

/// A write-ahead log position (PostgreSQL's `pg_lsn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `pg_lsn`'s text form, `16/B374D848`.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Which committed transactions capture from the WAL takes: those that
/// committed at or after `from` (what earlier passes enrolled is before it),
/// after the switch into WAL capture (`wal_from`: what committed before was
/// captured by the statement triggers), and before a switch back out of it
/// (`until`: what committed after is captured by the triggers again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub from: Lsn,
    pub wal_from: Lsn,
    pub until: Option<Lsn>,
}

impl Window {
    /// Whether an insert of a transaction that committed at `commit` into a
    /// source registered at `source_from` is captured.
    pub fn admits(&self, commit: Lsn, source_from: Lsn) -> bool {
        commit >= self.from
            && commit >= self.wal_from
            && commit >= source_from
            && self.until.is_none_or(|u| commit < u)
    }
}

/// Where the next pass starts. Decoding returned `rows` lines for a request
/// of at most `limit` up to `upto`; it stops only at a transaction's end,
/// so a full answer ends with a whole transaction, whose end `last_end` is.
/// A short answer took everything that committed before `upto`.
pub fn next_position(rows: usize, limit: usize, last_end: Option<Lsn>, upto: Lsn) -> Lsn {
    match last_end {
        Some(end) if rows >= limit => end,
        _ => upto,
    }
}

/// One captured insert, as the output plugin writes it (a line of JSON).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Captured {
    /// the commit record's position
    pub c: u64,
    /// the end of the commit record
    pub x: u64,
    /// user id, event name, event time (microseconds since 2000-01-01 UTC,
    /// PostgreSQL's own epoch), props
    pub u: String,
    pub e: String,
    pub t: i64,
    pub p: serde_json::Value,
}

/// Where a line's transaction commits and ends, whatever else the line holds.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Position {
    pub c: u64,
    pub x: u64,
}

/// A row the plugin could not read: it is skipped, with this reason logged,
/// and the rows after it are captured.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Unreadable {
    pub c: u64,
    pub x: u64,
    pub bad: String,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Line {
    Captured(Captured),
    Unreadable(Unreadable),
}

/// The plugin's line for an insert: `props` is JSON text already (jsonb's or
/// json's output, row_to_json's, or a text column checked to be JSON), so it
/// goes in as it is, not parsed and written again.
pub fn captured_line(
    commit: Lsn,
    end: Lsn,
    user: &str,
    event: &str,
    at: i64,
    props: &str,
) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string is JSON");
    format!(
        "{{\"c\":{},\"x\":{},\"u\":{},\"e\":{},\"t\":{at},\"p\":{props}}}",
        commit.0,
        end.0,
        q(user),
        q(event)
    )
}

pub fn unreadable_line(commit: Lsn, end: Lsn, why: &str) -> String {
    serde_json::to_string(&Unreadable {
        c: commit.0,
        x: end.0,
        bad: why.to_string(),
    })
    .expect("JSON")
}

/// What the plugin is told by the pass that reads it (its options).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PluginOptions {
    /// per source table (by oid): its mapping (the capture trigger's five
    /// arguments) and the position from which it is a source
    pub sources: std::collections::HashMap<u32, SourceOption>,
    /// the event names some trigger watches
    pub watched: Vec<String>,
    pub from: u64,
    pub wal_from: u64,
    pub until: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceOption {
    pub args: Vec<String>,
    pub from: u64,
}

impl PluginOptions {
    pub fn window(&self) -> Window {
        Window {
            from: Lsn(self.from),
            wal_from: Lsn(self.wal_from),
            until: self.until.map(Lsn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_and_print_as_pg_lsn_does() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("nonsense"), None);
        assert_eq!(Lsn::parse("1/XYZ"), None);
    }

    #[test]
    fn the_window_takes_what_committed_after_every_start_and_before_the_end() {
        let w = Window {
            from: Lsn(100),
            wal_from: Lsn(50),
            until: Some(Lsn(300)),
        };
        assert!(w.admits(Lsn(100), Lsn(0)), "the first commit not yet taken");
        assert!(!w.admits(Lsn(99), Lsn(0)), "enrolled by an earlier pass");
        assert!(
            !w.admits(Lsn(150), Lsn(200)),
            "before the table was a source"
        );
        assert!(w.admits(Lsn(250), Lsn(200)));
        assert!(!w.admits(Lsn(300), Lsn(0)), "the triggers capture it again");
        let open = Window { until: None, ..w };
        assert!(open.admits(Lsn(u64::MAX), Lsn(0)));
        let switched = Window {
            from: Lsn(0),
            wal_from: Lsn(500),
            until: None,
        };
        assert!(
            !switched.admits(Lsn(400), Lsn(0)),
            "the trigger captured it"
        );
    }

    #[test]
    fn a_full_answer_resumes_after_its_last_transaction_a_short_one_at_the_end() {
        assert_eq!(next_position(10, 10, Some(Lsn(70)), Lsn(90)), Lsn(70));
        assert_eq!(next_position(12, 10, Some(Lsn(70)), Lsn(90)), Lsn(70));
        assert_eq!(next_position(3, 10, Some(Lsn(70)), Lsn(90)), Lsn(90));
        assert_eq!(next_position(0, 10, None, Lsn(90)), Lsn(90));
    }

    #[test]
    fn lines_read_back_as_written() {
        let line = captured_line(
            Lsn(5),
            Lsn(9),
            "u\"1",
            "cart\nadded",
            -3,
            r#"{"a": [1, 2.50]}"#,
        );
        match serde_json::from_str::<Line>(&line).unwrap() {
            Line::Captured(c) => {
                assert_eq!(
                    (c.c, c.x, c.u.as_str(), c.e.as_str(), c.t),
                    (5, 9, "u\"1", "cart\nadded", -3)
                );
                assert_eq!(c.p["a"][1].to_string(), "2.50");
            }
            other => panic!("{other:?}"),
        }
        match serde_json::from_str::<Line>(&unreadable_line(Lsn(5), Lsn(9), "no time")).unwrap() {
            Line::Unreadable(u) => assert_eq!(u.bad, "no time"),
            other => panic!("{other:?}"),
        }
    }
}
