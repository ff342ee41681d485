//! WAL capture (`nudge.set_capture('wal')`) against a real server with
//! wal_level = logical: what the slot enrolls, exactly once, and what it
//! leaves alone. The month's equivalence with the other modes is in engine.rs.

use nudge_integration::{connect, connect_as, count, drop_slots, fresh_db, sqlstate, with_roles};

const SETUP: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.define_template('t', 'Hi', 'cart {{ event.cart }}');
    SELECT nudge.define_trigger('cart', '{"expire_after": "never", "on": {"event": "cart_added", "key": "cart"}, "wait": "1 hour",
        "unless": [{"event": "purchased", "same_key": true}], "template": "t"}');
    CREATE TABLE public.orders (id serial PRIMARY KEY, customer text, cart text, at timestamptz, note text);
"#;

fn wal_db(name: &str) -> (String, postgres::Client) {
    let db = fresh_db(name);
    let mut c = connect(&db);
    c.batch_execute(SETUP).unwrap();
    (db, c)
}

fn set_wal(c: &mut postgres::Client) {
    c.query_one("SELECT nudge.set_capture('wal')", &[]).unwrap();
}

fn capture(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT nudge.capture_pending()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn an_insert_runs_no_trigger_and_the_slot_enrolls_it_once() {
    let (_db, mut c) = wal_db("nudge_it_wal_once");
    c.batch_execute("SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();
    set_wal(&mut c);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'nudge_capture' AND tgenabled <> 'D'"
        ),
        0,
        "every source's capture trigger is off"
    );
    c.batch_execute(
        "SELECT nudge.track('u' || i, 'cart_added', jsonb_build_object('cart', 'k' || i), '2026-01-01 10:00+00')
           FROM generate_series(1, 50) i;
         INSERT INTO public.orders (customer, cart, at) SELECT 'u' || i, 'k' || i, '2026-01-01 10:30+00' FROM generate_series(1, 10) i;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        0,
        "nothing enrolled by the inserting statements"
    );
    assert_eq!(capture(&mut c), 60);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'"
        ),
        40
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited'"
        ),
        10
    );

    // a pass that commits and then dies before the slot moves: the next pass
    // (which, having written already, cannot move the slot either) reads the
    // same changes again and must take none of them twice
    let (slot_at, position): (String, String) = {
        let r = c
            .query_one(
                "SELECT s.confirmed_flush_lsn::text, w.position::text FROM nudge.wal_capture w
                   JOIN pg_replication_slots s ON s.slot_name = w.slot",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_ne!(
        slot_at, position,
        "the slot moves only in a later transaction"
    );
    let mut t = c.transaction().unwrap();
    t.batch_execute("INSERT INTO nudge.profiles (user_id, email) VALUES ('x', 'x@example.com')")
        .unwrap();
    let again: i64 = t
        .query_one("SELECT nudge.capture_pending()", &[])
        .unwrap()
        .get(0);
    t.commit().unwrap();
    assert_eq!(again, 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 50);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.journal WHERE step = 'exited'"
        ),
        10
    );

    // a fresh pass moves the slot up to what is enrolled
    assert_eq!(capture(&mut c), 0);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.wal_capture w JOIN pg_replication_slots s ON s.slot_name = w.slot
              WHERE s.confirmed_flush_lsn >= w.position - 1000"
        ),
        1
    );
    let (capture_mode, lag): (String, Option<i64>) = {
        let r = c
            .query_one(
                "SELECT capture, wal_lag_bytes FROM nudge.worker_status()",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(capture_mode, "wal");
    assert!(lag.is_some_and(|l| l >= 0));
    drop_slots("nudge_it_wal_once");
}

#[test]
fn updates_deletes_and_rolled_back_inserts_are_not_events() {
    let (_db, mut c) = wal_db("nudge_it_wal_dml");
    c.batch_execute("SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();
    set_wal(&mut c);
    c.batch_execute(
        "SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', '2026-01-01 10:00+00');
         SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', '2026-01-01 10:00+00');",
    )
    .unwrap();
    assert_eq!(capture(&mut c), 2);
    let mut t = c.transaction().unwrap();
    t.batch_execute(
        "INSERT INTO public.orders (customer, cart, at) VALUES ('u1', 'k1', '2026-01-01 10:30+00')",
    )
    .unwrap();
    t.rollback().unwrap();
    c.batch_execute("UPDATE nudge.events SET props = props || '{\"x\": 1}'; DELETE FROM nudge.events WHERE user_id = 'u2';")
        .unwrap();
    assert_eq!(capture(&mut c), 0);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'"
        ),
        2
    );
    drop_slots("nudge_it_wal_dml");
}

#[test]
fn a_source_added_or_dropped_in_wal_mode_captures_from_that_moment() {
    let (_db, mut c) = wal_db("nudge_it_wal_sources");
    set_wal(&mut c);
    c.batch_execute(
        "SELECT nudge.track('u' || i, 'cart_added', jsonb_build_object('cart', 'k' || i), '2026-01-01 10:00+00')
           FROM generate_series(1, 3) i;
         -- ordered before the table was a source: not a purchase
         INSERT INTO public.orders (customer, cart, at) VALUES ('u1', 'k1', '2026-01-01 10:10+00');",
    )
    .unwrap();
    c.batch_execute("SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_trigger WHERE tgname = 'nudge_capture' AND tgrelid = 'public.orders'::regclass AND tgenabled = 'D'"),
        1,
        "added in WAL mode, its trigger stays off"
    );
    c.batch_execute(
        "INSERT INTO public.orders (customer, cart, at) VALUES ('u2', 'k2', '2026-01-01 10:20+00')",
    )
    .unwrap();
    // dropping the source first enrolls what it inserted as a source
    c.batch_execute("SELECT nudge.drop_source('public.orders')")
        .unwrap();
    c.batch_execute(
        "INSERT INTO public.orders (customer, cart, at) VALUES ('u3', 'k3', '2026-01-01 10:30+00')",
    )
    .unwrap();
    capture(&mut c);
    let states: Vec<String> = c
        .query(
            "SELECT user_id || ' ' || state FROM nudge.enrollments ORDER BY user_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["u1 waiting", "u2 exited", "u3 waiting"]);
    drop_slots("nudge_it_wal_sources");
}

#[test]
fn an_unreadable_row_never_fails_the_insert_nor_stops_the_rows_after_it() {
    let (_db, mut c) = wal_db("nudge_it_wal_bad");
    c.batch_execute(
        "CREATE TABLE public.clicks (who text, what text, at text, props text);
         SELECT nudge.add_source('public.clicks', 'who', event_column => 'what', time_column => 'at', props_column => 'props');",
    )
    .unwrap();
    set_wal(&mut c);
    c.batch_execute(
        "INSERT INTO public.clicks VALUES ('u1', 'cart_added', 'not a time', '{\"cart\": \"k1\"}');
         INSERT INTO public.clicks VALUES ('u2', 'cart_added', '2026-01-01 10:00+00', 'not json');
         INSERT INTO public.clicks VALUES ('u3', 'cart_added', '2026-01-01 10:00+00', '{\"cart\": \"k3\"}');",
    )
    .unwrap();
    // JSON that serde reads and jsonb refuses, in a json column and in a
    // whole row taken as props
    c.batch_execute(
        "CREATE TABLE public.raw (who text, what text, body json);
         SELECT nudge.add_source('public.raw', 'who', event_column => 'what', props_column => 'body');
         CREATE TABLE public.rows (who text, what text, body json);
         SELECT nudge.add_source('public.rows', 'who', event_column => 'what');",
    )
    .unwrap();
    c.batch_execute(
        r#"INSERT INTO public.raw VALUES ('u4', 'cart_added', '{"cart": "a\u0000b"}');
           INSERT INTO public.rows VALUES ('u5', 'cart_added', '{"n": 1e1000000}');"#,
    )
    .unwrap();
    assert_eq!(capture(&mut c), 1);
    let users: Vec<String> = c
        .query("SELECT user_id FROM nudge.enrollments", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users, ["u3"]);
    // and they are behind us: the next pass takes nothing again
    assert_eq!(capture(&mut c), 0);
    drop_slots("nudge_it_wal_bad");
}

#[test]
fn leaving_wal_mode_hands_capture_back_to_the_triggers_without_a_gap() {
    let (db, mut c) = wal_db("nudge_it_wal_leave");
    set_wal(&mut c);
    c.batch_execute(
        "SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', '2026-01-01 10:00+00')",
    )
    .unwrap();
    let said: String = c
        .query_one("SELECT nudge.set_capture('immediate')", &[])
        .unwrap()
        .get(0);
    assert!(said.contains("read up to"), "{said}");
    assert_eq!(
        c.query_one("SELECT nudge.capture_mode()", &[])
            .unwrap()
            .get::<_, String>(0),
        "leaving wal"
    );
    // captured by the trigger again at once
    c.batch_execute(
        "SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', '2026-01-01 10:00+00')",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 1);
    // the slot gives the rest; a pass that does so and rolls back loses
    // nothing (the slot is dropped only by a later pass)
    let mut t = c.transaction().unwrap();
    let n: i64 = t
        .query_one("SELECT nudge.capture_pending()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    t.rollback().unwrap();
    assert_eq!(capture(&mut c), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 2);
    let mode: String = c
        .query_one("SELECT nudge.capture_mode()", &[])
        .unwrap()
        .get(0);
    assert_eq!(mode, "leaving wal");
    // the next pass sees that committed, and drops the slot
    assert_eq!(capture(&mut c), 0);
    assert_eq!(
        c.query_one("SELECT nudge.capture_mode()", &[])
            .unwrap()
            .get::<_, String>(0),
        "immediate"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ),
        0
    );
    // and it can come back
    set_wal(&mut c);
    drop(c);
    let mut c = connect(&db);
    c.batch_execute(
        "SELECT nudge.track('u3', 'cart_added', '{\"cart\": \"k3\"}', '2026-01-01 10:00+00')",
    )
    .unwrap();
    assert_eq!(capture(&mut c), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 3);
    drop_slots("nudge_it_wal_leave");
}

#[test]
fn set_capture_refuses_what_it_cannot_do_and_changes_nothing() {
    let tag = "walrefuse";
    let db = with_roles(tag);
    let mut c = connect(&db);
    c.batch_execute(SETUP).unwrap();
    // a slot can only be made before the transaction writes
    let mut t = c.transaction().unwrap();
    t.batch_execute("INSERT INTO nudge.profiles (user_id, email) VALUES ('x', 'x@example.com')")
        .unwrap();
    assert_eq!(
        sqlstate(t.query_one("SELECT nudge.set_capture('wal')", &[])),
        "25001"
    );
    t.rollback().unwrap();
    assert_eq!(
        sqlstate(c.query_one("SELECT nudge.set_capture('logical')", &[])),
        "22023"
    );
    assert_eq!(
        c.query_one("SELECT nudge.capture_mode()", &[])
            .unwrap()
            .get::<_, String>(0),
        "immediate"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.wal_capture"), 0);
    // only an admin chooses: the application's and the mailer's roles cannot
    for role in [format!("{tag}_writer"), format!("{tag}_mailer")] {
        let mut r = connect_as(&db, &role);
        assert_eq!(
            sqlstate(r.query_one("SELECT nudge.set_capture('wal')", &[])),
            "42501",
            "{role}"
        );
    }
    drop_slots("nudge_it_walrefuse");
}

#[test]
fn two_passes_at_once_take_each_insert_once() {
    let (db, mut c) = wal_db("nudge_it_wal_race");
    set_wal(&mut c);
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let mut w = connect(&db);
            for b in 0..40 {
                w.batch_execute(&format!(
                    "SELECT nudge.track('u' || i, 'cart_added', jsonb_build_object('cart', 'k{b}'), '2026-01-01 10:00+00')
                       FROM generate_series(1, 50) i"
                ))
                .unwrap();
            }
        })
    };
    let passes: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut p = connect(&db);
                let mut taken = 0i64;
                for _ in 0..60 {
                    taken += p
                        .query_one("SELECT nudge.capture_pending(300)", &[])
                        .unwrap()
                        .get::<_, i64>(0);
                }
                taken
            })
        })
        .collect();
    writer.join().unwrap();
    let mut taken: i64 = passes.into_iter().map(|p| p.join().unwrap()).sum();
    taken += capture(&mut c);
    assert_eq!(taken, 2000);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        2000
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT (user_id, key)) FROM nudge.enrollments"
        ),
        2000
    );
    drop_slots("nudge_it_wal_race");
}

#[test]
fn a_transaction_larger_than_a_pass_is_taken_whole_a_chunk_at_a_time() {
    let (_db, mut c) = wal_db("nudge_it_wal_big");
    set_wal(&mut c);
    c.batch_execute(
        "INSERT INTO nudge.events (user_id, event, occurred_at, props)
         SELECT 'u' || i, 'cart_added', '2026-01-01 10:00+00', jsonb_build_object('cart', 'k' || i)
           FROM generate_series(1, 50000) i",
    )
    .unwrap();
    c.batch_execute(
        "SELECT nudge.track('late', 'cart_added', '{\"cart\": \"k\"}', '2026-01-01 11:00+00')",
    )
    .unwrap();
    // a pass asked for 1,000 takes the whole first transaction (enrolled in
    // chunks), and stops at its end
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending(1000)"), 50000);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        50000
    );
    assert_eq!(capture(&mut c), 1);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT user_id) FROM nudge.enrollments"
        ),
        50001
    );
    drop_slots("nudge_it_wal_big");
}

#[test]
fn a_partitioned_source_is_read_through_its_partitions_and_unlogged_ones_are_refused() {
    let (_db, mut c) = wal_db("nudge_it_wal_parts");
    c.batch_execute(
        "CREATE TABLE public.clicks (who text, what text, at timestamptz, cart text) PARTITION BY RANGE (at);
         CREATE TABLE public.clicks_jan PARTITION OF public.clicks FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
         SELECT nudge.add_source('public.clicks', 'who', event_column => 'what', time_column => 'at');",
    )
    .unwrap();
    set_wal(&mut c);
    c.batch_execute(
        "INSERT INTO public.clicks VALUES ('u1', 'cart_added', '2026-01-02 10:00+00', 'k1')",
    )
    .unwrap();
    c.batch_execute(
        "CREATE TABLE public.clicks_feb PARTITION OF public.clicks FOR VALUES FROM ('2026-02-01') TO ('2026-03-01')",
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO public.clicks VALUES ('u2', 'cart_added', '2026-02-02 10:00+00', 'k2')",
    )
    .unwrap();
    assert_eq!(
        capture(&mut c),
        2,
        "both partitions, the one made after the switch too"
    );
    c.batch_execute("CREATE UNLOGGED TABLE public.scratch (who text, what text)")
        .unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(
            "SELECT nudge.add_source('public.scratch', 'who', event_column => 'what')"
        )),
        "55000"
    );
    drop_slots("nudge_it_wal_parts");
}
