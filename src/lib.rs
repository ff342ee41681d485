//! pg_nudge: behavioral triggered email inside PostgreSQL.
//!
//! `api` is the SQL surface, thin by design; `catalog` reads definitions and
//! templates; `engine` does capture (enroll/exit) and `run_due`; `sources`
//! wires user tables in as event sources. The rules themselves live in the
//! `nudge-core` crate, which is tested without a server.

use pgrx::prelude::*;

mod api;
mod catalog;
mod engine;
mod sources;
mod spi_util;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
