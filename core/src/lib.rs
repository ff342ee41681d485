//! The logic of pg_nudge that needs no server: trigger definitions and their
//! validation, predicates over JSON, the event-time sequencing of enrollments,
//! and template rendering. The extension crate is a thin SQL layer over this.

pub mod backtest;
pub mod claim_order;
pub mod consent;
pub mod date_entry;
pub mod decision;
pub mod definition;
pub mod experiment;
pub mod flow;
pub mod policy;
pub mod predicate;
pub mod render;
pub mod retry;
pub mod segment;
pub mod sender;
pub mod sequence;
pub mod signed;
pub mod sql;
pub mod time;
pub mod tracking;
pub mod wal;
