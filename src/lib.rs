//! pg_nudge: behavioral triggered email inside PostgreSQL.
//!
//! `api` is the SQL surface, thin by design; `catalog` reads definitions and
//! templates; `engine` does capture (enroll/exit) and `run_due`; `sources`
//! wires user tables in as event sources. The rules themselves live in the
//! `nudge-core` crate, which is tested without a server.

use pgrx::prelude::*;

mod all_events;
mod api;
mod catalog;
mod citus;
mod claim;
mod consent;
mod engine;
mod experiments;
mod isolate;
mod privilege;
mod settings;
mod sources;
mod spi_util;
mod tracking;
mod user_sql;
mod worker;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // The worker and its shared memory exist only when preloaded
    // (shared_preload_libraries = 'pg_nudge'); without it, run_due by hand.
    let preloaded = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::define(preloaded);
    if preloaded {
        worker::init_preloaded();
    }
}

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/outbox.sql",
    name = "outbox",
    requires = ["bootstrap"]
);
extension_sql_file!("../sql/ingest.sql", name = "ingest", requires = ["outbox"]);
extension_sql_file!("../sql/wal.sql", name = "wal", requires = ["ingest"]);
extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["wal"]);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The worker is tested by tests/integration against a server of our
        // own; here it would only contend with the framework for its database.
        vec![]
    }
}
