//! pg_dump / pg_restore keep what pg_nudge holds: definitions, sources with
//! their capture triggers, generated functions, events, journeys, messages,
//! suppressions. The restored database goes on: it sends the message that
//! was due, refuses the suppressed address, and captures new rows.

use nudge_integration::{connect, count, dsn, fresh_db};
use std::process::Command;

fn pg_bin(name: &str) -> String {
    let out = Command::new("pg_config").arg("--bindir").output().unwrap();
    format!("{}/{name}", String::from_utf8_lossy(&out.stdout).trim())
}

/// host, port and user of the test server, as pg_dump's flags.
fn conn_flags() -> Vec<String> {
    let mut flags = vec![];
    for part in dsn().split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            match k {
                "host" => flags.push(format!("--host={v}")),
                "port" => flags.push(format!("--port={v}")),
                "user" => flags.push(format!("--username={v}")),
                _ => {}
            }
        }
    }
    flags
}

/// `pg_dump --format=custom` of database `from`, restored into a new
/// database `into`; returns the new database's DSN.
fn dump_and_restore(from: &str, into: &str) -> String {
    let file = std::env::temp_dir().join(format!("{from}.pgdump"));
    let status = Command::new(pg_bin("pg_dump"))
        .args(conn_flags())
        .args(["--format=custom", &format!("--dbname={from}"), "--file"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");
    nudge_integration::drop_slots(into);
    let mut admin = connect(&dsn());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {into} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {into}"))
        .unwrap();
    let out = Command::new(pg_bin("pg_restore"))
        .args(conn_flags())
        .args([&format!("--dbname={into}"), "--exit-on-error"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    format!("{} dbname={into}", dsn())
}

#[test]
fn a_dump_restored_into_a_new_database_keeps_everything_and_goes_on() {
    let db = fresh_db("nudge_it_dump");
    let mut c = connect(&db);
    c.batch_execute(
        r#"CREATE SCHEMA app;
           CREATE TABLE app.orders (id serial, customer text, cart text, at timestamptz);
           CREATE TABLE app.loyalty (customer text, points int);
           INSERT INTO app.loyalty VALUES ('u1', 7), ('u2', 9);
           SELECT nudge.add_source('app.orders', 'customer', time_column => 'at', event_name => 'purchased');
           SELECT nudge.define_template('t', 'Cart {{ event.cart }}', '<p>{{ context.l.points }} points</p>');
           SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added", "key": "cart"}, "wait": "1 hour",
               "unless": [{"event": "purchased", "same_key": true}], "template": "t",
               "context": {"l": "SELECT points FROM app.loyalty WHERE customer = $1"}}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com'),
                                                             ('u3', 'u3@example.com');
           SELECT nudge.track('u1', 'cart_added', '{"cart": "k1"}', now() - interval '2 hours');
           SELECT nudge.track('u2', 'cart_added', '{"cart": "k2"}', now() - interval '30 minutes');
           SELECT nudge.track('u3', 'cart_added', '{"cart": "k3"}', now() - interval '3 hours');
           INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('u2@example.com', 'u2', 'unsubscribed');
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    // u1 and u3 were due: two messages; u2's journey waits (due in 30 minutes)
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.outbox"), 2);
    let restored = dump_and_restore("nudge_it_dump", "nudge_it_restored");
    let mut r = connect(&restored);
    for (table, n) in [
        ("nudge.triggers", 1),
        ("nudge.templates", 1),
        ("nudge.sources", 2),
        ("nudge.user_sql", 1),
        ("nudge.events", 3),
        ("nudge.enrollments", 3),
        ("nudge.outbox", 2),
        ("nudge.suppressions", 1),
        ("nudge.profiles", 3),
    ] {
        assert_eq!(
            count(&mut r, &format!("SELECT count(*) FROM {table}")),
            n,
            "rows of {table} after the restore"
        );
    }
    // the journey that was waiting comes due: the suppressed address gets nothing
    r.batch_execute("SELECT nudge.run_due(now() + interval '1 hour')")
        .unwrap();
    let u2: String = r
        .query_one(
            "SELECT state FROM nudge.enrollments WHERE user_id = 'u2'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(u2, "suppressed");
    // the source's capture trigger came back, and so did the generated function
    r.batch_execute(
        r#"SELECT nudge.track('u1', 'cart_added', '{"cart": "k9"}', now() - interval '2 hours');
           INSERT INTO app.orders (customer, cart, at) VALUES ('u1', 'k9', now() - interval '90 minutes');
           SELECT nudge.track('u1', 'cart_added', '{"cart": "k8"}', now() - interval '2 hours');
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    let k9: String = r
        .query_one("SELECT state FROM nudge.enrollments WHERE key = 'k9'", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        k9, "exited",
        "the restored source's insert was not captured"
    );
    let html: String = r
        .query_one("SELECT o.html FROM nudge.outbox o JOIN nudge.enrollments e ON e.message_key = o.message_key AND e.key = 'k8'", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        html, "<p>7 points</p>",
        "the restored generated function did not run"
    );
    // new rows do not collide with restored ids
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) - count(DISTINCT id) FROM nudge.events"
        ),
        0
    );
}

/// A dump of a database in WAL capture keeps the mode (and the sources'
/// triggers off); the restored database has no slot of its own yet (and the
/// dump names the original's): its first pass makes one, says so, and
/// captures from there, never reading the original's slot.
#[test]
fn a_restored_wal_capture_makes_a_slot_of_its_own() {
    let db = fresh_db("nudge_it_dump_wal");
    let mut c = connect(&db);
    c.batch_execute(
        r#"CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
           SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
           SELECT nudge.define_template('t', 'Cart {{ event.cart }}', '<p>cart</p>');
           SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added", "key": "cart"}, "wait": "1 hour",
               "unless": [{"event": "purchased", "same_key": true}], "template": "t"}');"#,
    )
    .unwrap();
    c.query_one("SELECT nudge.set_capture('wal')", &[]).unwrap();
    c.batch_execute(
        "SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '2 hours')",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 1);
    let restored = dump_and_restore("nudge_it_dump_wal", "nudge_it_restored_wal");
    let mut r = connect(&restored);
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM nudge.wal_capture"),
        1,
        "the mode is kept"
    );
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM pg_trigger WHERE tgname = 'nudge_capture' AND tgrelid = 'public.orders'::regclass AND tgenabled = 'D'"),
        1
    );
    // the first pass makes the restored database's own slot
    assert_eq!(count(&mut r, "SELECT nudge.capture_pending()"), 0);
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ),
        1
    );
    r.batch_execute("INSERT INTO public.orders (customer, cart, at) VALUES ('u1', 'k1', now() - interval '90 minutes')")
        .unwrap();
    assert_eq!(count(&mut r, "SELECT nudge.capture_pending()"), 1);
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited'"
        ),
        1
    );
    // the original's slot was left alone: its database still reads it
    c.batch_execute("SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', now())")
        .unwrap();
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 1);
    nudge_integration::drop_slots("nudge_it_dump_wal");
    nudge_integration::drop_slots("nudge_it_restored_wal");
}

/// Flows (0.9.0): a journey waiting at its second step, segment membership
/// and a watched table's change triggers survive a dump; the restored
/// database goes on with each.
#[test]
fn a_restored_database_keeps_steps_segments_and_watched_changes() {
    let db = fresh_db("nudge_it_dump_flows");
    let mut c = connect(&db);
    c.batch_execute(
        "SET timezone = 'UTC';
         CREATE TABLE public.accounts (id text, customer text, plan text);
         SELECT nudge.add_source('public.accounts', 'customer', event_name => 'opened');
         SELECT nudge.watch_changes('public.accounts', ARRAY['plan']);
         INSERT INTO nudge.profiles (user_id, email, attrs) VALUES ('u1', 'u1@example.com', '{\"vip\": false}');
         SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
         SELECT nudge.define_trigger('flow', '{\"on\": {\"event\": \"a\"}, \"steps\": [{\"template\": \"t\"}, {\"wait\": \"1 hour\", \"template\": \"t\"}]}');
         SELECT nudge.define_trigger('vip', '{\"on\": {\"segment_entered\": {\"vip\": {\"eq\": true}}}, \"template\": \"t\"}');
         SELECT nudge.define_trigger('upgraded', '{\"on\": {\"changed\": \"plan\"}, \"template\": \"t\"}');
         SELECT nudge.track('u1', 'a', '{}', now() - interval '10 minutes');
         SELECT nudge.run_due(now());
         UPDATE nudge.profiles SET attrs = '{\"vip\": true}' WHERE user_id = 'u1';
         INSERT INTO public.accounts VALUES ('a1', 'u1', 'free');",
    )
    .unwrap();
    let restored = dump_and_restore("nudge_it_dump_flows", "nudge_it_dump_flows_restored");
    let mut r = connect(&restored);
    assert_eq!(
        count(&mut r, "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'flow' AND step = 1 AND state = 'waiting'"),
        1
    );
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM nudge.segment_members WHERE trigger = 'vip' AND member"
        ),
        1
    );
    // still inside: the restored membership starts no second journey
    r.batch_execute(
        "UPDATE nudge.profiles SET attrs = '{\"vip\": true, \"x\": 1}' WHERE user_id = 'u1';
         UPDATE public.accounts SET plan = 'pro';
         SELECT nudge.run_due(now() + interval '2 hours');",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'vip'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'upgraded'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut r,
            "SELECT count(*) FROM nudge.outbox WHERE trigger = 'flow'"
        ),
        2
    );
}
