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
    // (DROP DATABASE drops a database's inactive slots too; a test's slot
    // is dropped first all the same, as a pass may still hold it)
    drop_slots(name);
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

/// Drops the replication slots of database `name` (WAL capture's): a slot
/// keeps WAL until it is dropped, and a server has a few.
pub fn drop_slots(name: &str) {
    let mut admin = Client::connect(&dsn(), NoTls).expect("connect");
    admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}'"
        ))
        .unwrap();
}

pub fn connect(db: &str) -> Client {
    Client::connect(db, NoTls).expect("connect")
}

/// The single bigint a query returns (a count).
pub fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Messages in the outbox, distinct message keys, distinct enrollments: the
/// three are equal when nothing was written twice.
pub fn outbox_uniqueness(c: &mut Client) -> (i64, i64, i64) {
    let r = c
        .query_one("SELECT count(*), count(DISTINCT message_key), count(DISTINCT enrollment_id) FROM nudge.outbox", &[])
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
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

/// Polls `check` until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > until {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A real SMTP server (aiosmtpd from PyPI) writing what it receives to a Maildir.
pub struct SmtpServer {
    pub port: u16,
    pub maildir: std::path::PathBuf,
    child: std::process::Child,
}

impl SmtpServer {
    pub fn start(name: &str) -> SmtpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = std::env::temp_dir().join(format!("nudge-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&maildir);
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(&maildir)
            .spawn()
            .expect("python3 -m aiosmtpd (scripts/setup.sh installs it)");
        let up = wait_for(20, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(up.is_some(), "the SMTP server did not start on port {port}");
        SmtpServer {
            port,
            maildir,
            child,
        }
    }

    /// Every message received, as the SMTP server wrote it.
    pub fn messages(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.maildir.join("new")) else {
            return vec![];
        };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect()
    }

    /// The Message-ID of every message received, one entry per delivery.
    pub fn message_ids(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.maildir.join("new")) else {
            return vec![];
        };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter_map(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Message-ID: ").map(|v| v.trim().to_string()))
            })
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.maildir);
    }
}

/// The reference mailer's binary (`make integration` builds it first).
pub fn mailer_bin() -> std::path::PathBuf {
    std::env::var_os("NUDGE_MAILER")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/nudge-mailer")
        })
}

/// A database of its own, with pg_nudge, and login roles named `{tag}_admin`,
/// `{tag}_admin2` (members of nudge_admin), `{tag}_writer`, `{tag}_mailer`,
/// `{tag}_plain` (USAGE on schema nudge, nothing else) and `{tag}_owner` (owns
/// the database, and so, on PostgreSQL 15, schema public). Each admin has a
/// schema of its own named after it. Returns the superuser DSN of the database.
pub fn with_roles(tag: &str) -> String {
    let name = format!("nudge_it_{tag}");
    let mut admin = Client::connect(&dsn(), NoTls).expect("connect to the test server");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    for r in ["admin", "admin2", "writer", "mailer", "plain", "owner"] {
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {tag}_{r}"))
            .unwrap();
    }
    // the extension creates nudge_admin, nudge_writer and nudge_mailer
    let db = fresh_db(&name);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {tag}_admin LOGIN IN ROLE nudge_admin;
             CREATE ROLE {tag}_admin2 LOGIN IN ROLE nudge_admin;
             CREATE ROLE {tag}_writer LOGIN IN ROLE nudge_writer;
             CREATE ROLE {tag}_mailer LOGIN IN ROLE nudge_mailer;
             CREATE ROLE {tag}_plain LOGIN;
             CREATE ROLE {tag}_owner LOGIN;"
        ))
        .unwrap();
    let mut c = connect(&db);
    c.batch_execute(&format!(
        "ALTER DATABASE {name} OWNER TO {tag}_owner;
         GRANT USAGE ON SCHEMA nudge TO {tag}_plain;
         CREATE SCHEMA {tag}_admin AUTHORIZATION {tag}_admin;
         CREATE SCHEMA {tag}_admin2 AUTHORIZATION {tag}_admin2;"
    ))
    .unwrap();
    db
}

/// A login of `role` (a real connection, not SET ROLE) to the database of `db`.
pub fn connect_as(db: &str, role: &str) -> Client {
    Client::connect(&format!("{db} user={role}"), NoTls).expect("connect as a role")
}

/// The SQLSTATE of a failed statement, or "ok".
pub fn sqlstate(r: Result<impl Sized, postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e
            .code()
            .map_or_else(|| format!("no code: {e}"), |c| c.code().to_string()),
    }
}

/// An event of a replayed history: user, event, props (JSON text), seconds
/// after the history's start.
pub type HistoryEvent = (String, String, String, i64);

/// Lives through `events` one at a time, the engine running at each
/// instant: `run_due` at the event's time, then the event (its user prefixed
/// with `prefix`), and a last `run_due` at `end` seconds. Returns how many
/// messages the passes wrote.
pub fn live_through(
    c: &mut Client,
    events: &[HistoryEvent],
    start: &str,
    end: f64,
    prefix: &str,
) -> i32 {
    let mut written: i32 = 0;
    for (u, e, p, s) in events {
        let at = *s as f64;
        written += c
            .query_one(
                "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second')",
                &[&start, &at],
            )
            .unwrap()
            .get::<_, i32>(0);
        c.execute(
            "SELECT nudge.track($6 || $1, $2, $3::text::jsonb, $4::text::timestamptz + $5 * interval '1 second')",
            &[u, e, p, &start, &at, &prefix],
        )
        .unwrap();
    }
    written
        + c.query_one(
            "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)",
            &[&start, &end],
        )
        .unwrap()
        .get::<_, i32>(0)
}

/// Loads `events` in one statement (their users prefixed with `prefix`),
/// each at `start` plus its seconds.
pub fn load_at_once(c: &mut Client, events: &[HistoryEvent], start: &str, prefix: &str) {
    let users: Vec<String> = events.iter().map(|e| format!("{prefix}{}", e.0)).collect();
    let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let props: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
    let secs: Vec<i64> = events.iter().map(|e| e.3).collect();
    c.execute(
        "INSERT INTO nudge.events (user_id, event, props, occurred_at)
         SELECT u, e, p::jsonb, $5::text::timestamptz + s * interval '1 second'
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS x(u, e, p, s)",
        &[&users, &names, &props, &secs, &start],
    )
    .unwrap();
}
