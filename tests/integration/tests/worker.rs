//! The background worker on a server with pg_nudge preloaded
//! (`nudge.database = 'nudge_it_worker'`, as `make test-server` starts it).

use nudge_integration::{connect, count, dsn, fresh_db, outbox_uniqueness, wait_for};
use postgres::Client;
use std::time::{Duration, Instant};

const DB: &str = "nudge_it_worker";

fn setup(db: &str) -> Client {
    let mut c = connect(db);
    c.batch_execute(
        r#"SELECT nudge.define_template('t', 'Hello {{ user_id }}', '<p>{{ event.n }}</p>');
           SELECT nudge.define_trigger('at_once', '{"on": {"event": "ping"}, "template": "t"}');
           SELECT nudge.define_trigger('later', '{"on": {"event": "pong"}, "wait": "5 minutes", "template": "t"}');
           INSERT INTO nudge.profiles (user_id, email)
           SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 20000) i;"#,
    )
    .unwrap();
    c
}

/// Sets (or, with None, resets) a server setting and reloads the configuration.
fn set_setting(name: &str, value: Option<&str>) {
    let mut admin = connect(&dsn());
    match value {
        Some(v) => admin
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{v}'"))
            .unwrap(),
        None => admin
            .batch_execute(&format!("ALTER SYSTEM RESET {name}"))
            .unwrap(),
    }
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn due_enrollments_reach_the_outbox_without_run_due() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    c.batch_execute(
        "INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'pong', now() - interval '10 minutes', '{}' FROM generate_series(1, 50) i",
    )
    .unwrap();
    let done = wait_for(15, || {
        (count(&mut c, "SELECT count(*) FROM nudge.outbox") == 50).then_some(())
    });
    assert!(
        done.is_some(),
        "the worker wrote {} of 50",
        count(&mut c, "SELECT count(*) FROM nudge.outbox")
    );
    let row = c
        .query_one(
            "SELECT running, messages, lag IS NULL FROM nudge.worker_status()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, i64>(1) >= 50);
    assert!(
        row.get::<_, bool>(2),
        "nothing is left due, so there is no lag"
    );
    let name: String = c
        .query_one(
            "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'pg_nudge%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(name, "pg_nudge worker");
}

#[test]
fn a_capture_due_at_once_wakes_a_sleeping_worker() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    wait_for(20, || {
        c.query_opt("SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker' AND datname = $1", &[&DB])
            .unwrap()
    })
    .expect("the worker serves the new database");
    // With a ten-minute nap, only the wake-up on commit can deliver in time.
    set_setting("nudge.naptime", Some("600s"));
    // Let the worker take the setting (SIGHUP) and go back to sleep.
    std::thread::sleep(Duration::from_millis(1500));
    // An enrollment written behind the engine's back wakes nobody: it stays
    // due, which shows the worker really sleeps for the reloaded ten minutes.
    c.batch_execute(
        "INSERT INTO nudge.enrollments (trigger, trigger_version, user_id, entered_at, due_at, anchor_event, last_entry_at)
         VALUES ('at_once', 1, 'u2', now(), now(), 'ping', now())",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let asleep = count(&mut c, "SELECT count(*) FROM nudge.outbox") == 0;
    let passes: i64 = c
        .query_one("SELECT passes FROM nudge.worker_status()", &[])
        .unwrap()
        .get(0);
    let start = Instant::now();
    c.batch_execute("SELECT nudge.track('u1', 'ping', '{\"n\": 1}')")
        .unwrap();
    let arrived = wait_for(20, || {
        (count(&mut c, "SELECT count(*) FROM nudge.outbox") == 2).then_some(())
    });
    let took = start.elapsed();
    set_setting("nudge.naptime", None);
    assert!(
        asleep,
        "the worker should have been asleep for 600 s (SIGHUP reload)"
    );
    assert!(
        arrived.is_some(),
        "the messages did not arrive: the worker was not woken"
    );
    let after: i64 = c
        .query_one("SELECT passes FROM nudge.worker_status()", &[])
        .unwrap()
        .get(0);
    assert!(after > passes, "it took a pass of the worker");
    eprintln!("zero-wait event to outbox row: {took:?}");
}

#[test]
fn killing_the_worker_loses_nothing_and_duplicates_nothing() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    set_setting("nudge.batch_size", Some("500"));
    c.batch_execute(
        "INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'pong', now() - interval '10 minutes', jsonb_build_object('n', i) FROM generate_series(1, 20000) i",
    )
    .unwrap();
    let pid: i32 = wait_for(20, || {
        let started = count(&mut c, "SELECT count(*) FROM nudge.outbox") > 0;
        let pid = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker'",
                &[],
            )
            .unwrap()
            .map(|r| r.get::<_, i32>(0));
        if started {
            pid
        } else {
            None
        }
    })
    .expect("the worker started writing");
    let written_before: i64 = count(&mut c, "SELECT count(*) FROM nudge.outbox");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(c);
    // The postmaster restarts everything after a crash. A connection made in
    // the moment before it does is cut too, so every poll connects afresh.
    let finished = wait_for(120, || {
        let mut c = postgres::Client::connect(&db, postgres::NoTls).ok()?;
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'",
                &[],
            )
            .ok()?
            .get(0);
        (waiting == 0).then_some(c)
    });
    set_setting("nudge.batch_size", None);
    let mut c = finished.expect("the restarted worker did not finish");
    assert!(
        written_before < 20000,
        "the kill came before the end ({written_before} written)"
    );
    assert_eq!(outbox_uniqueness(&mut c), (20000, 20000, 20000));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'sent'"
        ),
        20000
    );
}

/// A message the database refuses (a constraint stands in for any data it
/// cannot take) is set aside, failed with the error and counted; the rest of
/// its batch goes, and the worker carries on.
#[test]
fn a_refused_message_is_set_aside_and_the_rest_of_its_batch_goes() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    let failed_before: i64 = c
        .query_one("SELECT failed FROM nudge.worker_status()", &[])
        .unwrap()
        .get(0);
    c.batch_execute("ALTER TABLE nudge.outbox ADD CONSTRAINT refuse_u1 CHECK (user_id <> 'u1')")
        .unwrap();
    c.batch_execute(
        "BEGIN; SELECT nudge.track('u1', 'ping'); SELECT nudge.track('u2', 'ping'); COMMIT;",
    )
    .unwrap();
    let done = wait_for(20, || {
        let f: i64 = c
            .query_one("SELECT failed FROM nudge.worker_status()", &[])
            .ok()?
            .get(0);
        (f > failed_before && count(&mut c, "SELECT count(*) FROM nudge.outbox") == 1).then_some(())
    });
    assert!(done.is_some(), "u1 set aside and counted, u2 sent");
    let reason: String = c
        .query_one(
            "SELECT reason FROM nudge.enrollments WHERE user_id = 'u1' AND state = 'failed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(reason.contains("refuse_u1"), "{reason}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE user_id = 'u2'"
        ),
        1
    );
    c.batch_execute("ALTER TABLE nudge.outbox DROP CONSTRAINT refuse_u1")
        .unwrap();
    let row = c
        .query_one("SELECT running FROM nudge.worker_status()", &[])
        .unwrap();
    assert!(row.get::<_, bool>(0), "the worker carried on");
}

#[test]
fn the_worker_enrolls_and_sends_what_deferred_capture_queued() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    // naptime long: only the wake-up of the queueing commit can bring the worker in time
    set_setting("nudge.naptime", Some("600000"));
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute(
        "SET nudge.deferred_capture = on;
         INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'ping', now(), '{\"n\": 1}' FROM generate_series(1, 200) i",
    )
    .unwrap();
    let done = wait_for(10, || {
        (count(&mut c, "SELECT count(*) FROM nudge.outbox") == 200).then_some(())
    });
    set_setting("nudge.naptime", None);
    assert!(
        done.is_some(),
        "the worker wrote {} of 200 (queued: {})",
        count(&mut c, "SELECT count(*) FROM nudge.outbox"),
        count(&mut c, "SELECT count(*) FROM nudge.capture_queue")
    );
    assert_eq!(count(&mut c, "SELECT queued FROM nudge.worker_status()"), 0);
    assert_eq!(outbox_uniqueness(&mut c), (200, 200, 200));
}

/// pg_terminate_backend (and so `pg_ctl stop -m fast`) ends the worker in the
/// middle of a long drain: 0.2.0 read pgrx's SIGTERM flag between batches,
/// which cleared it, and never stopped. The postmaster starts a new one,
/// which finishes the work: nothing lost, nothing twice.
#[test]
fn sigterm_during_a_drain_stops_the_worker() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    set_setting("nudge.batch_size", Some("20"));
    c.batch_execute(
        "INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'pong', now() - interval '10 minutes', jsonb_build_object('n', i) FROM generate_series(1, 20000) i",
    )
    .unwrap();
    let worker = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker'";
    let pid: i32 = wait_for(20, || {
        let started = count(&mut c, "SELECT count(*) FROM nudge.outbox") > 0;
        let pid = c
            .query_opt(worker, &[])
            .unwrap()
            .map(|r| r.get::<_, i32>(0));
        pid.filter(|_| started)
    })
    .expect("the worker started writing");
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let at = count(&mut c, "SELECT count(*) FROM nudge.outbox");
    let replaced = wait_for(10, || {
        let now = c
            .query_opt(worker, &[])
            .unwrap()
            .map(|r| r.get::<_, i32>(0));
        (now != Some(pid)).then_some(())
    });
    assert!(
        replaced.is_some(),
        "the worker (pid {pid}) was still running 10 s after SIGTERM"
    );
    assert!(
        at < 20000,
        "the SIGTERM came before the end of the drain ({at} written)"
    );
    let finished = wait_for(120, || {
        (count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'",
        ) == 0)
            .then_some(())
    });
    set_setting("nudge.batch_size", None);
    assert!(
        finished.is_some(),
        "the new worker did not finish the drain"
    );
    assert_eq!(outbox_uniqueness(&mut c), (20000, 20000, 20000));
}

/// WAL capture with the worker: no commit wakes it, it reads the slot by
/// itself. Terminated while it reads and enrolls the slot's transactions,
/// the worker that replaces it takes up where the last committed pass got
/// to: every insert enrolled once, none lost.
#[test]
fn the_worker_captures_from_the_wal_once_across_a_sigterm() {
    let db = fresh_db(DB);
    let mut c = setup(&db);
    c.query_one("SELECT nudge.set_capture('wal')", &[]).unwrap();
    set_setting("nudge.naptime", Some("600000"));
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute(
        "INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'ping', now(), '{\"n\": 1}' FROM generate_series(1, 200) i",
    )
    .unwrap();
    let done = wait_for(10, || {
        (count(&mut c, "SELECT count(*) FROM nudge.outbox") == 200).then_some(())
    });
    assert!(
        done.is_some(),
        "the worker wrote {} of 200 from the slot, with a naptime of 10 minutes",
        count(&mut c, "SELECT count(*) FROM nudge.outbox")
    );
    let row = c
        .query_one("SELECT capture, wal_lag_bytes, wal_lag < interval '10 seconds' FROM nudge.worker_status()", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "wal");
    assert!(row.get::<_, Option<i64>>(1).is_some());
    assert!(
        row.get::<_, bool>(2),
        "the slot was read to its end moments ago"
    );

    // many transactions, then SIGTERMs while the worker works through them
    for b in 0..40 {
        c.batch_execute(&format!(
            "INSERT INTO nudge.events (user_id, event, occurred_at, props)
             SELECT 'u' || ({b} * 500 + i), 'pong', now() - interval '10 minutes', '{{\"n\": 2}}' FROM generate_series(1, 500) i"
        ))
        .unwrap();
    }
    let worker = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker'";
    for _ in 0..3 {
        if let Some(pid) = c
            .query_opt(worker, &[])
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
        {
            c.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let finished = wait_for(120, || {
        (count(&mut c, "SELECT count(*) FROM nudge.outbox") >= 20200).then_some(())
    });
    set_setting("nudge.naptime", None);
    assert!(
        finished.is_some(),
        "the workers wrote {} of 20,200",
        count(&mut c, "SELECT count(*) FROM nudge.outbox")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        20200
    );
    assert_eq!(outbox_uniqueness(&mut c), (20200, 20200, 20200));
    c.query_one("SELECT nudge.set_capture('immediate')", &[])
        .unwrap();
    // one pass reads the slot to the switch, a later one drops it
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 0);
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 0);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ),
        0
    );
}
