//! The engine: capture (enroll and exit as events arrive) and run_due
//! (send what is due). Both read their batch once, decide in Rust, and write
//! each table with one statement.

pub mod backtest;
pub mod capture;
pub mod changes;
pub mod compose;
pub mod deferred;
pub mod engagement;
pub mod recheck;
pub mod run_due;
pub mod segments;
pub mod source_row;
pub mod transition;
pub mod wal;
