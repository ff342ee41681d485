//! Helpers for integration tests against a real server: each test gets a
//! database of its own with the extension freshly created.

use postgres::{Client, NoTls};

/// The server to test against (`make integration` sets NUDGE_TEST_DSN).
pub fn dsn() -> String {
    std::env::var("NUDGE_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 port=28815 user=postgres".into())
}

/// Creates database `name` anew with pg_nudge installed; returns its DSN.
pub fn fresh_db(name: &str) -> String {
    let mut admin = Client::connect(&dsn(), NoTls)
        .expect("connect to the test server (is it running? see `make test-server`)");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let db = format!("{} dbname={name}", dsn());
    let mut c = connect(&db);
    c.batch_execute("CREATE EXTENSION pg_nudge; SET timezone = 'UTC'")
        .unwrap();
    db
}

pub fn connect(db: &str) -> Client {
    Client::connect(db, NoTls).expect("connect")
}

/// A small deterministic generator (SplitMix64), so that data sets are the
/// same on every run without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
