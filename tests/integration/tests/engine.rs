//! The engine against a real server, through a real client: event time,
//! concurrency and idempotency.

use nudge_integration::{
    connect, count, drop_slots, fresh_db, live_through, load_at_once, outbox_uniqueness, Rng,
};
use std::collections::BTreeSet;

const SETUP: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.define_template('cart', 'Cart {{ event.cart_id }} for {{ profile.first_name | default: "you" }}', '<p>{{ event.cart_id }}</p>');
    SELECT nudge.define_template('thanks', 'Thanks for order {{ event.cart_id }}', '<p>thanks</p>');
    SELECT nudge.define_trigger('cart_abandon', '{"expire_after": "never", "on": {"event": "cart_added", "key": "cart_id"}, "wait": "24 hours",
        "unless": [{"event": "purchased", "same_key": true}, {"event": "unsubscribed"}], "template": "cart"}');
    SELECT nudge.define_trigger('post_purchase', '{"expire_after": "never", "on": {"event": "purchased"}, "wait": "48 hours", "template": "thanks"}');
"#;

/// The same triggers with every send-time policy that is decided in event
/// time: audience, re-entry cooldown, global and per-trigger caps,
/// quiet hours in the recipients' zones.
const SETUP_WITH_POLICIES: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.configure('{"caps": [{"max": 2, "per": "1 day"}], "default_timezone": "America/New_York"}');
    SELECT nudge.define_template('cart', 'Cart {{ event.cart_id }}', '<p>{{ event.cart_id }}</p>');
    SELECT nudge.define_template('thanks', 'Thanks for order {{ event.cart_id }}', '<p>thanks</p>');
    SELECT nudge.define_trigger('cart_abandon', '{"expire_after": "never", "on": {"event": "cart_added", "key": "cart_id"}, "wait": "24 hours",
        "unless": [{"event": "purchased", "same_key": true}, {"event": "unsubscribed"}],
        "audience": {"tier": {"ne": "blocked"}}, "reentry": {"cooldown": "6 hours"},
        "quiet_hours": {"start": "21:00", "end": "08:00"}, "template": "cart"}');
    SELECT nudge.define_trigger('post_purchase', '{"expire_after": "never", "on": {"event": "purchased"}, "wait": "48 hours",
        "cap": [{"max": 1, "per": "3 days"}], "template": "thanks"}');
"#;

/// A month of events for 150 users, in time order.
fn history() -> Vec<(String, String, String, i64)> {
    let mut rng = Rng::new(42);
    let mut out = vec![];
    let mut t: i64 = 0; // seconds after the start
    for _ in 0..3000 {
        t += rng.below(900) as i64; // about a month in all
        let user = format!("u{}", rng.below(150));
        let cart = format!("c{}", rng.below(4));
        let (event, props) = match rng.below(10) {
            0..=5 => ("cart_added", format!(r#"{{"cart_id": "{cart}"}}"#)),
            6..=8 => ("purchased", format!(r#"{{"cart_id": "{cart}"}}"#)),
            _ => ("unsubscribed", "{}".to_string()),
        };
        out.push((user, event.to_string(), props, t));
    }
    out
}

const START: &str = "2026-01-01 00:00:00+00";

/// Asserts two sets are equal, showing only where they differ.
fn same(what: &str, bulk: &BTreeSet<String>, live: &BTreeSet<String>) {
    let only_bulk: Vec<&String> = bulk.difference(live).take(5).collect();
    let only_live: Vec<&String> = live.difference(bulk).take(5).collect();
    assert!(
        only_bulk.is_empty() && only_live.is_empty(),
        "{what} differ:\n  only loaded at once: {only_bulk:#?}\n  only lived through: {only_live:#?}"
    );
}

fn outcome(db: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut c = connect(db);
    let messages = c
        .query(
            "SELECT trigger || ' ' || user_id || ' ' || message_key || ' ' || subject || ' '
                    || extract(epoch FROM available_at)::text FROM nudge.outbox",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let journeys = c
        .query(
            "SELECT trigger || ' ' || user_id || ' ' || key || ' ' || extract(epoch FROM entered_at)::text || ' ' || state
                    || ' ' || coalesced::text || ' ' || coalesce(reason, '') FROM nudge.enrollments
             UNION ALL
             -- refusals: a statement's refusals of a user for one rule are one
             -- line with their count, so compare the counts per user and rule
             SELECT trigger || ' ' || user_id || ' not entered ' || split_part(detail, ':', 1) || ' x'
                    || sum(coalesce((regexp_match(detail, '\\((\\d+) entry events'))[1]::int, 1))
               FROM nudge.journal WHERE step = 'not entered'
              GROUP BY trigger, user_id, split_part(detail, ':', 1)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (messages, journeys)
}

/// A database with `setup`'s triggers and 150 users with an email each (a
/// few of them outside the policies' audience, in several time zones).
fn shop(db: &str, setup: &str) -> postgres::Client {
    let mut c = connect(db);
    c.batch_execute(setup).unwrap();
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email, timezone, attrs)
         SELECT 'u' || i, 'u' || i || '@example.com',
                (ARRAY['Europe/Berlin', 'Asia/Tokyo', NULL])[1 + i % 3],
                jsonb_build_object('tier', CASE WHEN i % 10 = 0 THEN 'blocked' ELSE 'ok' END)
           FROM generate_series(0, 149) i",
    )
    .unwrap();
    c
}

/// How a test's inserts are captured (`nudge.set_capture`).
#[derive(Clone, Copy, PartialEq)]
enum Capture {
    Immediate,
    Deferred,
    Wal,
}

impl Capture {
    /// Switches `c`'s database (and session) to this mode, in a transaction
    /// of its own as WAL capture needs.
    fn apply(self, c: &mut postgres::Client) {
        match self {
            Capture::Immediate => {}
            Capture::Deferred => c.batch_execute("SET nudge.deferred_capture = on").unwrap(),
            Capture::Wal => {
                c.query_one("SELECT nudge.set_capture('wal')", &[]).unwrap();
            }
        }
    }
}

/// Loads the month at once and lives through it event by event, with the
/// triggers of `setup`; both must write the same messages and journeys.
/// The bulk load is captured by `bulk_mode`, living through by `live_mode`.
fn month_twice(setup: &str, bulk_db: &str, live_db: &str, mode: Capture) -> String {
    month_with(setup, bulk_db, live_db, mode, mode)
}

fn month_with(
    setup: &str,
    bulk_db: &str,
    live_db: &str,
    bulk_mode: Capture,
    live_mode: Capture,
) -> String {
    let events = history();
    let end = events.last().unwrap().3 + 4 * 86_400;

    // Loaded at once, one run_due at the end.
    let bulk = fresh_db(bulk_db);
    let mut c = shop(&bulk, setup);
    bulk_mode.apply(&mut c);
    load_at_once(&mut c, &events, START, "");
    if bulk_mode == Capture::Deferred {
        // queued, not yet enrolled: run_due enrolls them first
        assert!(count(&mut c, "SELECT count(*) FROM nudge.capture_queue") > 1000);
    }
    if bulk_mode != Capture::Immediate {
        assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 0);
    }
    let written: i32 = c
        .query_one(
            "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)",
            &[&START, &(end as f64)],
        )
        .unwrap()
        .get(0);

    // Lived through: one event at a time, the engine running at each instant.
    let live = fresh_db(live_db);
    let mut c = shop(&live, setup);
    live_mode.apply(&mut c);
    let live_written = live_through(&mut c, &events, START, end as f64, "");

    let (bulk_msgs, bulk_journeys) = outcome(&bulk);
    let (live_msgs, live_journeys) = outcome(&live);
    assert!(
        bulk_msgs.len() > 100,
        "the history should send plenty: {}",
        bulk_msgs.len()
    );
    assert!(
        bulk_journeys.iter().any(|j| j.contains(" exited ")),
        "and exit some journeys"
    );
    same("messages", &bulk_msgs, &live_msgs);
    same("journeys", &bulk_journeys, &live_journeys);
    assert_eq!(written, live_written);
    assert_eq!(written as usize, bulk_msgs.len());
    drop_slots(bulk_db);
    drop_slots(live_db);
    bulk
}

#[test]
fn a_month_loaded_in_one_statement_sends_what_living_through_it_sends() {
    month_twice(SETUP, "nudge_it_bulk", "nudge_it_live", Capture::Immediate);
}

#[test]
fn wal_capture_enrolls_the_month_as_immediate_capture_does() {
    // loaded in one transaction and read back from the slot; lived through
    // with each event read from the slot by the next run_due
    month_twice(
        SETUP_WITH_POLICIES,
        "nudge_it_bulk_w",
        "nudge_it_live_w",
        Capture::Wal,
    );
    // and the slot's month gives what immediate capture of it gives
    month_with(
        SETUP,
        "nudge_it_bulk_w2",
        "nudge_it_live_w2",
        Capture::Wal,
        Capture::Immediate,
    );
}

#[test]
fn deferred_capture_enrolls_the_month_as_immediate_capture_does() {
    // the month queued by deferred capture, enrolled by run_due, then sent:
    // the same journeys, refusals and messages as living through it
    month_twice(
        SETUP_WITH_POLICIES,
        "nudge_it_bulk_d",
        "nudge_it_live_d",
        Capture::Deferred,
    );
}

#[test]
fn with_every_event_time_policy_too() {
    let bulk = month_twice(
        SETUP_WITH_POLICIES,
        "nudge_it_bulk_p",
        "nudge_it_live_p",
        Capture::Immediate,
    );
    // and every policy did act on that month
    let mut c = connect(&bulk);
    for (what, sql) in [
        ("global cap", "SELECT count(*) FROM nudge.enrollments WHERE reason = 'cap: 2 per 1 day (global)'"),
        ("trigger cap", "SELECT count(*) FROM nudge.enrollments WHERE reason = 'cap: 1 per 3 days (this trigger)'"),
        ("quiet hours", "SELECT count(*) FROM nudge.enrollments WHERE reason LIKE '%by the send schedule'"),
        ("audience", "SELECT count(*) FROM nudge.journal WHERE detail LIKE 'audience%'"),
        ("cooldown", "SELECT count(*) FROM nudge.journal WHERE detail LIKE 'reentry cooldown%'"),
    ] {
        let n: i64 = c.query_one(sql, &[]).unwrap().get(0);
        assert!(n > 0, "{what} never acted");
    }
}

#[test]
fn run_due_from_two_connections_writes_each_message_once() {
    let db = fresh_db("nudge_it_race");
    let mut c = connect(&db);
    c.batch_execute(SETUP).unwrap();
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 3000) i;
         INSERT INTO nudge.events (user_id, event, props, occurred_at)
         SELECT 'u' || i, 'cart_added', jsonb_build_object('cart_id', 'c' || i), '2026-01-01 00:00+00' FROM generate_series(1, 3000) i;",
    )
    .unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut c = connect(&db);
                let mut total = 0;
                loop {
                    let n: i32 = c
                        .query_one("SELECT nudge.run_due('2026-01-03 00:00+00', 200)", &[])
                        .unwrap()
                        .get(0);
                    if n == 0 {
                        // SKIP LOCKED can see nothing while the other holds the rest; make sure.
                        let left: i64 = c
                            .query_one(
                                "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'",
                                &[],
                            )
                            .unwrap()
                            .get(0);
                        if left == 0 {
                            break;
                        }
                    }
                    total += n;
                }
                total
            })
        })
        .collect();
    let totals: Vec<i32> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(totals.iter().sum::<i32>(), 3000, "per worker: {totals:?}");
    assert_eq!(outbox_uniqueness(&mut c), (3000, 3000, 3000));
    // And again, later: nothing more.
    let n: i32 = c
        .query_one("SELECT nudge.run_due('2026-02-01 00:00+00')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn concurrent_captures_of_one_cart_coalesce_into_one_journey() {
    let db = fresh_db("nudge_it_capture");
    let mut c = connect(&db);
    c.batch_execute(SETUP).unwrap();
    let mut a = connect(&db);
    let mut b = connect(&db);
    a.batch_execute("BEGIN; SELECT nudge.track('u1', 'cart_added', '{\"cart_id\": \"k\"}', '2026-01-01 00:00+00')").unwrap();
    // b's capture waits for a's transaction (per-user lock), then sees its journey.
    let t = std::thread::spawn(move || {
        b.batch_execute(
            "SELECT nudge.track('u1', 'cart_added', '{\"cart_id\": \"k\"}', '2026-01-01 00:05+00')",
        )
        .unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.batch_execute("COMMIT").unwrap();
    t.join().unwrap();
    let rows = c
        .query(
            "SELECT state, coalesced FROM nudge.enrollments WHERE user_id = 'u1'",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].get::<_, String>(0), rows[0].get::<_, i32>(1)),
        ("waiting".to_string(), 1)
    );
}

/// A cancel of the statement that runs run_due (pg_cancel_backend, a
/// client's ^C) while a definer's query runs ends that statement: 0.2.0 took
/// it for that user's failure and failed the message for good.
#[test]
fn a_cancelled_run_due_cancels_and_fails_no_message() {
    let db = fresh_db("nudge_it_cancel");
    let mut c = connect(&db);
    c.batch_execute(
        r#"SELECT nudge.define_template('t', 'Hi', '<p>{{ context.nap.slept }}</p>');
           SELECT nudge.define_trigger('slow', '{"on": {"event": "e"}, "template": "t",
               "context": {"nap": "SELECT pg_sleep(3)::text AS slept"}}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
           SELECT nudge.track('u1', 'e', '{}', now() - interval '1 minute');"#,
    )
    .unwrap();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let canceller = std::thread::spawn({
        let db = db.clone();
        move || {
            std::thread::sleep(std::time::Duration::from_millis(700));
            connect(&db)
                .execute("SELECT pg_cancel_backend($1)", &[&pid])
                .unwrap();
        }
    });
    let err = c.batch_execute("SELECT nudge.run_due()").unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.code().map(|s| s.code()), Some("57014"), "{err:?}");
    let state: String = c
        .query_one(
            "SELECT state FROM nudge.enrollments WHERE user_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "waiting", "the cancel failed the message");
}

/// Caps weigh what the outbox holds for a user; passes running at once
/// (several connections, one enrollment each) give the verdicts of one pass:
/// with a cap of one a day, each user gets one of their two messages.
#[test]
fn concurrent_passes_hold_a_cap_as_one_pass_does() {
    let db = fresh_db("nudge_it_cap_race");
    let mut c = connect(&db);
    c.batch_execute(
        r#"SELECT nudge.configure('{"caps": [{"max": 1, "per": "1 day"}]}');
           SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
           SELECT nudge.define_trigger('a', '{"on": {"event": "a"}, "template": "t"}');
           SELECT nudge.define_trigger('b', '{"on": {"event": "b"}, "template": "t"}');
           INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 400) i;
           -- each user's two journeys side by side, at one instant
           DO $$ BEGIN
               FOR i IN 1..400 LOOP
                   INSERT INTO nudge.events (user_id, event, occurred_at)
                   VALUES ('u' || i, 'a', '2026-01-01 00:00+00'), ('u' || i, 'b', '2026-01-01 00:00+00');
               END LOOP;
           END $$;"#,
    )
    .unwrap();
    let passes: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut c = connect(&db);
                loop {
                    c.query_one("SELECT nudge.run_due('2026-01-01 00:01+00', 1)", &[])
                        .unwrap();
                    let left: i64 = c
                        .query_one(
                            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'",
                            &[],
                        )
                        .unwrap()
                        .get(0);
                    if left == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for p in passes {
        p.join().unwrap();
    }
    let over = count(
        &mut c,
        "SELECT count(*) FROM (SELECT user_id FROM nudge.outbox GROUP BY user_id HAVING count(*) > 1) o",
    );
    assert_eq!(
        over, 0,
        "users sent two messages despite a cap of one a day"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.outbox"), 400);
}

/// Every policy at once: audience, re-entry, caps (global and per trigger),
/// quiet hours, priority between triggers due together, a holdout and
/// variants.
const SETUP_EVERY: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.configure('{"caps": [{"max": 2, "per": "1 day"}], "arbitration_window": "2 hours",
                             "default_timezone": "America/New_York"}');
    SELECT nudge.define_template('cart', 'Cart {{ event.cart_id }}', '<p>{{ event.cart_id }}</p>');
    SELECT nudge.define_template('cart_b', 'Still want cart {{ event.cart_id }}?', '<p>{{ event.cart_id }}</p>');
    SELECT nudge.define_template('browse', 'Seen something?', '<p>browse</p>');
    SELECT nudge.define_template('thanks', 'Thanks for order {{ event.cart_id }}', '<p>thanks</p>');
    SELECT nudge.define_trigger('cart_abandon', '{"expire_after": "never", "on": {"event": "cart_added", "key": "cart_id"}, "wait": "24 hours",
        "unless": [{"event": "purchased", "same_key": true}, {"event": "unsubscribed"}],
        "audience": {"tier": {"ne": "blocked"}}, "reentry": {"cooldown": "6 hours"},
        "quiet_hours": {"start": "21:00", "end": "08:00"}, "priority": 5, "holdout": 0.2,
        "variants": [{"name": "A", "template": "cart"}, {"name": "B", "template": "cart_b"}]}');
    SELECT nudge.define_trigger('browse_nudge', '{"expire_after": "never", "on": {"event": "cart_added"}, "wait": "24 hours",
        "quiet_hours": {"start": "21:00", "end": "08:00"}, "priority": 1, "on_conflict": "defer", "template": "browse"}');
    SELECT nudge.define_trigger('post_purchase', '{"expire_after": "never", "on": {"event": "purchased"}, "wait": "48 hours",
        "cap": [{"max": 1, "per": "3 days"}], "template": "thanks"}');
"#;

/// The month in one statement, into a new database with `setup`.
fn loaded(db: &str, setup: &str) -> postgres::Client {
    let events = history();
    let mut c = shop(db, setup);
    load_at_once(&mut c, &events, START, "");
    c
}

fn month_end() -> f64 {
    (history().last().unwrap().3 + 4 * 86_400) as f64
}

/// Live, loaded at once, drained by several passes at once, and backtested:
/// the same verdict for every journey, and every policy acted. Then
/// suppressions and purchases arrive while the messages wait in the outbox:
/// none of those messages is handed to a mailer.
#[test]
fn every_policy_decides_alike_lived_loaded_drained_at_once_and_backtested() {
    // lived through, one event at a time
    let live = fresh_db("nudge_it_every_live");
    let mut c = shop(&live, SETUP_EVERY);
    for (u, e, p, s) in &history() {
        let at = *s as f64;
        c.query_one(
            "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second')",
            &[&START, &at],
        )
        .unwrap();
        c.execute(
            "SELECT nudge.track($1, $2, $3::text::jsonb, $4::text::timestamptz + $5 * interval '1 second')",
            &[u, e, p, &START, &at],
        )
        .unwrap();
    }
    let end = month_end();
    let due_all = "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)";
    c.query_one(due_all, &[&START, &end]).unwrap();

    // loaded at once, one pass
    let bulk = fresh_db("nudge_it_every_bulk");
    loaded(&bulk, SETUP_EVERY)
        .query_one(due_all, &[&START, &end])
        .unwrap();

    // loaded at once, drained by three passes at once in small batches
    let drained = fresh_db("nudge_it_every_drained");
    drop(loaded(&drained, SETUP_EVERY));
    let passes: Vec<_> = (0..3)
        .map(|_| {
            let db = drained.clone();
            std::thread::spawn(move || {
                let mut c = connect(&db);
                loop {
                    c.query_one(
                        "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 40)",
                        &[&START, &end],
                    )
                    .unwrap();
                    let left = count(
                        &mut c,
                        &format!("SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'
                                   AND due_at <= '{START}'::timestamptz + {end} * interval '1 second'"),
                    );
                    if left == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for p in passes {
        p.join().unwrap();
    }

    let (live_msgs, live_journeys) = outcome(&live);
    for (what, db) in [("loaded at once", &bulk), ("drained at once", &drained)] {
        let (msgs, journeys) = outcome(db);
        same(&format!("messages ({what})"), &msgs, &live_msgs);
        same(&format!("journeys ({what})"), &journeys, &live_journeys);
    }
    let mut c = connect(&live);
    let rules = |c: &mut postgres::Client, sql: &str| -> std::collections::BTreeMap<String, i64> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect()
    };
    let by_rule = rules(
        &mut c,
        "SELECT state || ': ' || coalesce(rule, '-'), count(*) FROM nudge.enrollments GROUP BY 1
         UNION ALL SELECT 'not entered: ' || rule, count(*) FROM nudge.journal WHERE step = 'not entered' GROUP BY rule
         UNION ALL SELECT 'deferred', count(*) FROM nudge.enrollments WHERE reason LIKE '%by the send schedule%'",
    );
    for acted in [
        "suppressed: cap",
        "suppressed: priority",
        "held_out: holdout",
        "exited: exit",
        "sent: -",
        "not entered: audience",
        "not entered: reentry",
        "deferred",
    ] {
        assert!(
            by_rule.get(acted).copied().unwrap_or(0) > 0,
            "{acted} never acted: {by_rule:?}"
        );
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT variant) FROM nudge.outbox WHERE trigger = 'cart_abandon'"
        ),
        2,
        "both variants went out"
    );

    // backtest of the cart trigger alone, against the same trigger living alone
    // (backtest weighs a definition's own messages, not other triggers')
    let alone = fresh_db("nudge_it_every_alone");
    let cart_only = SETUP_EVERY
        .split("SELECT nudge.define_trigger('browse_nudge'")
        .next()
        .unwrap();
    let mut a = loaded(&alone, cart_only);
    a.query_one(due_all, &[&START, &end]).unwrap();
    let live_counts = rules(
        &mut a,
        "SELECT 'entered', count(*) FROM nudge.enrollments
         UNION ALL SELECT CASE state WHEN 'sent' THEN 'sent' WHEN 'held_out' THEN 'held out' WHEN 'exited' THEN 'exited'
                                     ELSE state || ': ' || rule END, count(*) FROM nudge.enrollments
          WHERE state <> 'waiting' GROUP BY 1
         UNION ALL SELECT 'not entered: ' || rule, sum(coalesce((regexp_match(detail, '\\((\\d+) entry events'))[1]::int, 1))::bigint
           FROM nudge.journal WHERE step = 'not entered' GROUP BY rule",
    );
    let replayed = rules(
        &mut a,
        &format!(
            "SELECT outcome, journeys FROM nudge.backtest(
                 (SELECT definition FROM nudge.trigger_versions WHERE trigger = 'cart_abandon'),
                 '{START}', '{START}'::timestamptz + {end} * interval '1 second', 'cart_abandon')
              WHERE outcome NOT IN ('coalesced entries', 'sent later (send schedule)', 'waiting at the end')"
        ),
    );
    assert_eq!(
        replayed, live_counts,
        "backtest and the live trigger disagree"
    );
    assert!(replayed.get("held out").copied().unwrap_or(0) > 0);

    // while the live database's messages wait (a mailer's backlog, minutes
    // old): five users are suppressed and five carts bought
    c.batch_execute(
        "UPDATE nudge.outbox SET checked_at = checked_at - interval '10 minutes';
         CREATE TEMP TABLE gone AS
         SELECT DISTINCT user_id FROM nudge.outbox WHERE status = 'pending' ORDER BY user_id LIMIT 5;
         INSERT INTO nudge.suppressions (email, user_id, reason)
         SELECT user_id || '@example.com', user_id, 'unsubscribed' FROM gone;
         CREATE TEMP TABLE bought AS
         SELECT o.message_key, o.user_id, e.key, o.scheduled_at FROM nudge.outbox o
           JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
          WHERE o.trigger = 'cart_abandon' AND o.user_id NOT IN (SELECT user_id FROM gone)
          ORDER BY o.id LIMIT 5;
         SELECT count(nudge.track(user_id, 'purchased', jsonb_build_object('cart_id', key), scheduled_at - interval '1 second'))
           FROM bought;",
    )
    .unwrap();
    // a mailer claims everything (the worker's pass re-checks the backlog first)
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.claim(100000)"),
        0,
        "nothing is claimable before the re-check"
    );
    c.batch_execute("SELECT nudge.run_due()").unwrap();
    let handed = count(
        &mut c,
        "SELECT count(*) FILTER (WHERE user_id IN (SELECT user_id FROM gone)
                                    OR message_key IN (SELECT message_key FROM bought))
           FROM nudge.claim(100000)",
    );
    assert_eq!(
        handed, 0,
        "a message went to a suppressed or converted user"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'cancelled' AND rule = 'exit'
                        AND message_key IN (SELECT message_key FROM bought)"
        ),
        5
    );
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'cancelled' AND rule = 'suppression'"
        ) >= 5
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited' AND rule = 'exit'
                        AND message_key IN (SELECT message_key FROM bought)"
        ),
        5,
        "the journeys say why"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'pending'"
        ),
        0
    );
}

/// A statement big enough that its transition table spills to disk: the
/// capture trigger reads each row in a memory context of its own, reset row
/// by row, while the tuple it read belongs to the slot (freed at the next
/// read). Reset in the wrong order, a 10,000,000-row COPY crashed the server.
#[test]
fn a_statement_of_300000_rows_is_captured_in_both_trigger_modes() {
    let db = fresh_db("nudge_it_big_statement");
    let mut c = connect(&db);
    c.batch_execute(
        r#"SELECT nudge.define_template('t', 'Hi', 'x');
           SELECT nudge.define_trigger('v', '{"on": {"event": "viewed"}, "wait": "1 day", "template": "t"}');
           CREATE TABLE public.clicks (who text, what text, at timestamptz, n int);
           SELECT nudge.add_source('public.clicks', 'who', event_column => 'what', time_column => 'at');
           INSERT INTO public.clicks SELECT 'u' || (i % 1000), 'viewed', '2026-01-01', i FROM generate_series(1, 300000) i;"#,
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        1000
    );
    c.batch_execute(
        "SET nudge.deferred_capture = on;
         INSERT INTO public.clicks SELECT 'w' || (i % 1000), 'viewed', '2026-01-01', i FROM generate_series(1, 300000) i;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.capture_queue"),
        300000
    );
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 300000);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments"),
        2000
    );
}
