//! Journeys of several steps against a real server: a three-step cart flow
//! with a branch on the first email being opened, a purchase exit and a
//! step's own exit, lived through event by event, loaded at once and
//! backtested.

use nudge_integration::{connect, count, fresh_db, Rng};
use std::collections::{BTreeMap, BTreeSet};

const START: &str = "2026-03-01 00:00:00+00";

const SETUP: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.define_template('c1', 'Your cart {{ event.cart_id }}', '<p>1</p>');
    SELECT nudge.define_template('c2', 'Still thinking about {{ event.cart_id }}?', '<p>2</p>');
    SELECT nudge.define_template('c3', '10% off {{ event.cart_id }}', '<p>3</p>');
    SELECT nudge.define_trigger('cart_flow', '{
        "expire_after": "never",
        "on": {"event": "cart_added", "key": "cart_id"},
        "unless": [{"event": "purchased", "same_key": true}],
        "steps": [
            {"name": "reminder", "wait": "1 hour", "template": "c1"},
            {"name": "nudge", "wait": "1 day", "template": "c2",
             "if": {"steps.reminder.opened": {"eq": true}}, "else": "discount"},
            {"name": "discount", "wait": "2 days", "template": "c3",
             "unless": [{"event": "coupon_used"}]}
        ]}');
    INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(0, 39) i;
"#;

/// Ten days of events of 40 users, in time order: (user, event, props, seconds after START).
fn history() -> Vec<(String, String, String, i64)> {
    let mut rng = Rng::new(7);
    let mut out = vec![];
    let mut t: i64 = 0;
    for _ in 0..500 {
        t += rng.below(1800) as i64;
        let user = format!("u{}", rng.below(40));
        let cart = format!(r#"{{"cart_id": "c{}"}}"#, rng.below(3));
        let (event, props) = match rng.below(20) {
            0..=11 => ("cart_added", cart),
            12..=16 => ("purchased", cart),
            _ => ("coupon_used", "{}".to_string()),
        };
        out.push((user, event.to_string(), props, t));
    }
    out
}

/// The whole history in one INSERT, as a bulk load would bring it.
fn load(c: &mut postgres::Client, events: &[(String, String, String, i64)]) {
    let col = |f: fn(&(String, String, String, i64)) -> String| -> Vec<String> {
        events.iter().map(f).collect()
    };
    let secs: Vec<i64> = events.iter().map(|e| e.3).collect();
    c.execute(
        "INSERT INTO nudge.events (user_id, event, props, occurred_at)
         SELECT u, e, p::jsonb, $5::text::timestamptz + s * interval '1 second'
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS x(u, e, p, s)",
        &[
            &col(|e| e.0.clone()),
            &col(|e| e.1.clone()),
            &col(|e| e.2.clone()),
            &secs,
            &START,
        ],
    )
    .unwrap();
}

/// Users with an even number open their reminder ten minutes after it went.
const OPEN_REMINDERS: &str = "
    SELECT count(nudge.record_engagement(o.message_key, 'opened', o.scheduled_at + interval '10 minutes'))
      FROM nudge.outbox o
      JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
     WHERE e.step = 0 AND o.opened_at IS NULL AND substr(o.user_id, 2)::int % 2 = 0";

fn run_due(c: &mut postgres::Client, secs: f64) {
    c.query_one(
        "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)",
        &[&START, &secs],
    )
    .unwrap();
    c.query_one(OPEN_REMINDERS, &[]).unwrap();
}

/// Every step of every journey, and every message.
fn outcome(db: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut c = connect(db);
    let rows = |c: &mut postgres::Client, sql: &str| -> BTreeSet<String> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let journeys = rows(
        &mut c,
        "SELECT user_id || ' ' || key || ' ' || extract(epoch FROM entered_at)::text || ' step ' || step
                || ' ' || state || ' ' || coalesce(rule, '-') || ' due ' || extract(epoch FROM due_at)::text
           FROM nudge.enrollments",
    );
    let messages = rows(
        &mut c,
        "SELECT user_id || ' ' || message_key || ' ' || subject || ' ' || extract(epoch FROM available_at)::text
           FROM nudge.outbox",
    );
    (journeys, messages)
}

fn same(what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>) {
    let only_a: Vec<&String> = a.difference(b).take(5).collect();
    let only_b: Vec<&String> = b.difference(a).take(5).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "{what} differ:\n  only loaded: {only_a:#?}\n  only lived: {only_b:#?}"
    );
}

/// The done-when of flows: lived through (a pass before every event), loaded
/// in one statement and drained pass by pass, and backtested, the flow gives
/// the same steps, the same messages and the same per-step numbers; the
/// branch, both exits and every step acted.
#[test]
fn a_three_step_flow_with_a_branch_and_exits_is_the_same_lived_loaded_and_backtested() {
    let events = history();
    let end = (events.last().unwrap().3 + 5 * 86_400) as f64;

    let live = fresh_db("nudge_it_flow_live");
    let mut c = connect(&live);
    c.batch_execute(SETUP).unwrap();
    for (u, e, p, s) in &events {
        run_due(&mut c, *s as f64);
        c.execute(
            "SELECT nudge.track($1, $2, $3::text::jsonb, $4::text::timestamptz + $5 * interval '1 second')",
            &[u, e, p, &START, &(*s as f64)],
        )
        .unwrap();
    }
    // the last journeys' steps
    let waiting = format!(
        "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'
           AND due_at <= '{START}'::timestamptz + {end} * interval '1 second'"
    );
    while count(&mut c, &waiting) > 0 {
        run_due(&mut c, end);
    }

    let bulk = fresh_db("nudge_it_flow_bulk");
    let mut b = connect(&bulk);
    b.batch_execute(SETUP).unwrap();
    load(&mut b, &events);
    // each pass decides a step of every journey (and what is due before the
    // next steps): the opens of the reminders are recorded between passes,
    // before the step that reads them
    let waiting = format!(
        "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'
           AND due_at <= '{START}'::timestamptz + {end} * interval '1 second'"
    );
    while count(&mut b, &waiting) > 0 {
        run_due(&mut b, end);
    }

    let (live_journeys, live_messages) = outcome(&live);
    let (bulk_journeys, bulk_messages) = outcome(&bulk);
    same("journeys", &bulk_journeys, &live_journeys);
    same("messages", &bulk_messages, &live_messages);

    // every part of the flow acted
    let per_step: BTreeMap<String, i64> = c
        .query(
            "SELECT step || ' ' || state || ' ' || coalesce(rule, '-'), count(*) FROM nudge.enrollments GROUP BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for acted in [
        "0 sent -",
        "0 exited exit",
        "1 sent -",
        "1 skipped branch",
        "2 sent -",
        "2 exited exit",
    ] {
        assert!(
            per_step.get(acted).copied().unwrap_or(0) > 0,
            "{acted} never happened: {per_step:?}"
        );
    }
    // coupon_used ends only the discount step
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE step = 2 AND state = 'exited' AND reason LIKE '%coupon_used%'"
        ) > 0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE step < 2 AND state = 'exited' AND reason LIKE '%coupon_used%'"
        ),
        0,
        "a step's own exit ended another step"
    );
    // the branch: only openers got the nudge, the others went to the discount
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox o JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
              WHERE e.step = 1 AND substr(o.user_id, 2)::int % 2 = 1"
        ),
        0
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments WHERE step = 1 AND state = 'skipped' AND substr(user_id, 2)::int % 2 = 0"),
        0
    );

    // trigger_stats: a row per step, as the enrollments count them
    let stats: BTreeMap<String, (i64, i64, i64, i64, i64)> = c
        .query(
            "SELECT step, entered, sent, exited, skipped, opened FROM nudge.trigger_stats WHERE trigger = 'cart_flow'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect();
    assert_eq!(
        stats.keys().cloned().collect::<Vec<_>>(),
        ["discount", "nudge", "reminder"]
    );
    let reminder = stats["reminder"];
    assert_eq!(
        reminder.0,
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE step = 0"
        )
    );
    assert!(
        reminder.4 > 0,
        "opens of the reminder are counted: {stats:?}"
    );
    assert_eq!(stats["nudge"].3, per_step["1 skipped branch"]);

    // backtest of the live trigger, per step, against what it did
    let live_counts: BTreeMap<(String, String), i64> = c
        .query(
            "SELECT nudge._step_name('cart_flow', trigger_version, step),
                    CASE state WHEN 'sent' THEN 'sent' WHEN 'exited' THEN 'exited' WHEN 'held_out' THEN 'held out'
                               ELSE state || ': ' || rule END, count(*)
               FROM nudge.enrollments GROUP BY 1, 2
             UNION ALL
             SELECT 'reminder', 'entered', count(*) FROM nudge.enrollments WHERE step = 0",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let replayed: BTreeMap<(String, String), i64> = c
        .query(
            &format!(
                "SELECT step, outcome, journeys FROM nudge.backtest(
                     (SELECT definition FROM nudge.trigger_versions WHERE trigger = 'cart_flow'),
                     '{START}', '{START}'::timestamptz + {end} * interval '1 second', 'cart_flow')
                  WHERE outcome NOT IN ('coalesced entries', 'waiting at the end')"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    assert_eq!(replayed, live_counts, "backtest and the live flow disagree");

    // explain tells the journey step by step
    let user: String = c
        .query_one(
            "SELECT user_id FROM nudge.enrollments WHERE step = 2 AND state = 'sent' ORDER BY user_id LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let lines: Vec<String> = c
        .query(
            "SELECT step || ': ' || coalesce(detail, '') FROM nudge.explain('cart_flow', $1)",
            &[&user],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let text = lines.join("\n");
    for want in [
        "step reminder, due",
        "next step: step discount (key ",
        "sent: step discount (key ",
    ] {
        assert!(text.contains(want), "explain lacks {want:?}:\n{text}");
    }
}

/// A definition with steps is checked like any other: a bad step is an
/// error naming its JSON path, with SQLSTATE 22023, and defines nothing.
#[test]
fn a_bad_step_is_refused_with_its_path() {
    let db = fresh_db("nudge_it_flow_bad");
    let mut c = connect(&db);
    c.batch_execute(SETUP).unwrap();
    for (def, want) in [
        (
            r#"{"on": {"event": "a"}, "steps": [{"template": "c1"}, {"template": "c2", "if": {"steps.2.opened": {"eq": true}}}]}"#,
            "steps[1].if.steps.2.opened: \"2\" is not an earlier step",
        ),
        (
            r#"{"on": {"event": "a"}, "wait": "1 hour", "steps": [{"template": "c1"}]}"#,
            "wait: with steps, each step gives its own wait",
        ),
        (
            r#"{"on": {"event": "a"}, "steps": [{"template": "c1", "if": {"profile.vip": {"eq": true}}, "else": "later"}]}"#,
            "steps[0].else: no step named \"later\"",
        ),
        (
            r#"{"on": {"event": "a"}, "steps": [{"template": "c1"}, {"template": "nope"}]}"#,
            "steps[1].template: no template named \"nope\"",
        ),
    ] {
        let err = c
            .query_one(
                "SELECT nudge.define_trigger('bad_flow', $1::text::jsonb)",
                &[&def],
            )
            .unwrap_err();
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(db_err.code().code(), "22023", "{def}");
        assert!(
            db_err.message().contains(want),
            "{def}: {}",
            db_err.message()
        );
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.triggers WHERE name = 'bad_flow'"
        ),
        0
    );
    // preview renders any step, by name
    let subject: String = c
        .query_one(
            "SELECT subject FROM nudge.preview('cart_flow', 'u1', 'discount')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(subject.starts_with("10% off"), "{subject}");
    let err = c
        .query_one(
            "SELECT subject FROM nudge.preview('cart_flow', 'u1', 'later')",
            &[],
        )
        .unwrap_err();
    let e = err.as_db_error().expect("a database error");
    assert_eq!(e.code().code(), "22023");
    assert!(
        e.message().contains("its steps: reminder, nudge, discount"),
        "{}",
        e.message()
    );
}

const SETUP_DATES: &str = r#"
    SET timezone = 'UTC';
    SELECT nudge.define_template('ending', 'Your trial ends {{ event.trial_ends_at | in_time_zone | date: "%b %d" }}', '<p>ends</p>');
    SELECT nudge.define_template('bday', 'Happy birthday', '<p>bday</p>');
    SELECT nudge.define_trigger('trial_ending', '{
        "on": {"event": "trial_started", "key": "account", "date": "trial_ends_at", "offset": "-3 days", "at": "09:00"},
        "unless": [{"event": "purchased"}], "template": "ending", "expire_after": "never"}');
    SELECT nudge.define_trigger('birthday', '{
        "on": {"event": "signed_up", "date": "birthday", "every": "year", "at": "10:00"},
        "template": "bday", "expire_after": "never"}');
    SELECT nudge.define_trigger('trial_two', '{
        "on": {"event": "trial_started", "key": "account", "date": "trial_ends_at", "offset": "-3 days", "at": "09:00"},
        "unless": [{"event": "purchased"}], "expire_after": "never",
        "steps": [{"name": "early", "template": "ending"}, {"name": "day", "wait": "3 days", "template": "ending"}]}');
    INSERT INTO nudge.profiles (user_id, email, timezone) VALUES
        ('berlin', 'b@example.com', 'Europe/Berlin'), ('berlin2', 'b2@example.com', 'Europe/Berlin'),
        ('york', 'y@example.com', 'America/New_York'), ('moved', 'm@example.com', 'Europe/Berlin'),
        ('removed', 'r@example.com', 'Europe/Berlin'), ('bought', 'p@example.com', 'Europe/Berlin');
"#;

/// Date entry: three days before the trial ends, at 09:00 the recipient's
/// time, on either side of a change of daylight saving time; a new date
/// moves the journey, a removed one ends it, a purchase exits it; a birthday
/// comes every year. A backtest of the trigger agrees with what it did.
#[test]
fn a_date_trigger_goes_at_the_local_hour_across_dst_and_follows_its_date() {
    let db = fresh_db("nudge_it_flow_dates");
    let mut c = connect(&db);
    c.batch_execute(SETUP_DATES).unwrap();
    c.batch_execute(
        r#"
        -- Berlin moves to summer time on 29 March, New York on 8 March
        SELECT nudge.track('berlin',  'trial_started', '{"account": "a", "trial_ends_at": "2026-03-31T12:00:00+00:00"}', '2026-03-01 10:00+00');
        SELECT nudge.track('berlin2', 'trial_started', '{"account": "b", "trial_ends_at": "2026-04-02"}', '2026-03-01 10:00+00');
        SELECT nudge.track('york',    'trial_started', '{"account": "c", "trial_ends_at": "2026-03-10"}', '2026-03-01 10:00+00');
        SELECT nudge.track('moved',   'trial_started', '{"account": "d", "trial_ends_at": "2026-04-02"}', '2026-03-01 10:00+00');
        SELECT nudge.track('moved',   'trial_started', '{"account": "d", "trial_ends_at": "2026-04-16"}', '2026-03-05 10:00+00');
        SELECT nudge.track('removed', 'trial_started', '{"account": "e", "trial_ends_at": "2026-04-02"}', '2026-03-01 10:00+00');
        SELECT nudge.track('removed', 'trial_started', '{"account": "e", "trial_ends_at": null}', '2026-03-05 10:00+00');
        SELECT nudge.track('bought',  'trial_started', '{"account": "f", "trial_ends_at": "2026-04-02"}', '2026-03-01 10:00+00');
        SELECT nudge.track('bought',  'purchased', '{}', '2026-03-20 10:00+00');
        SELECT nudge.track('berlin',  'signed_up', '{"birthday": "1990-03-05"}', '2026-03-01 10:00+00');
        "#,
    )
    .unwrap();
    let due = |c: &mut postgres::Client, user: &str| -> Vec<String> {
        c.query(
            "SELECT to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || state
               FROM nudge.enrollments WHERE user_id = $1 AND trigger = 'trial_ending' ORDER BY entered_at",
            &[&user],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // 28 March 09:00 CET; 30 March 09:00 CEST (the date alone goes at "at");
    // 7 March 09:00 EST
    assert_eq!(due(&mut c, "berlin"), ["2026-03-28 08:00 waiting"]);
    assert_eq!(due(&mut c, "berlin2"), ["2026-03-30 07:00 waiting"]);
    assert_eq!(due(&mut c, "york"), ["2026-03-07 14:00 waiting"]);
    assert_eq!(
        due(&mut c, "moved"),
        ["2026-03-30 07:00 exited", "2026-04-13 07:00 waiting"]
    );
    assert_eq!(due(&mut c, "removed"), ["2026-03-30 07:00 exited"]);
    assert_eq!(due(&mut c, "bought"), ["2026-03-30 07:00 exited"]);

    c.batch_execute(
        "SELECT nudge.run_due('2026-03-07 14:00+00'); SELECT nudge.run_due('2026-03-28 08:00+00');
         SELECT nudge.run_due('2026-03-30 07:00+00'); SELECT nudge.run_due('2026-04-13 07:00+00');",
    )
    .unwrap();
    let sent: Vec<String> = c
        .query(
            "SELECT user_id || ' ' || to_char(available_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || subject
               FROM nudge.outbox WHERE trigger = 'trial_ending' ORDER BY available_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        sent,
        [
            "york 2026-03-07 14:00 Your trial ends Mar 10",
            "berlin 2026-03-28 08:00 Your trial ends Mar 31",
            "berlin2 2026-03-30 07:00 Your trial ends Apr 02",
            "moved 2026-04-13 07:00 Your trial ends Apr 16",
        ]
    );

    // a date entry of two steps: three days before at 09:00, then on the day
    let two: Vec<String> = c
        .query(
            "SELECT step || ' ' || to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || state
               FROM nudge.enrollments WHERE trigger = 'trial_two' AND user_id = 'berlin2' ORDER BY step",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(two, ["0 2026-03-30 07:00 sent", "1 2026-04-02 07:00 sent"]);
    // the period's last steps, then the backtest of the same period
    c.batch_execute("SELECT nudge.run_due('2026-05-01 00:00+00')")
        .unwrap();
    let per_step = |c: &mut postgres::Client, sql: &str| -> BTreeMap<(String, String), i64> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect()
    };
    let replayed = per_step(
        &mut c,
        "SELECT step, outcome, journeys FROM nudge.backtest(
             (SELECT definition FROM nudge.trigger_versions WHERE trigger = 'trial_two'),
             '2026-03-01', '2026-05-01', 'trial_two')",
    );
    let lived = per_step(
        &mut c,
        "SELECT nudge._step_name('trial_two', trigger_version, step), state, count(*) FROM nudge.enrollments
          WHERE trigger = 'trial_two' GROUP BY 1, 2
         UNION ALL SELECT 'early', 'entered', count(*) FROM nudge.enrollments WHERE trigger = 'trial_two' AND step = 0",
    );
    assert_eq!(replayed, lived);

    // the birthday: 5 March, four days after sign-up, 10:00 in Berlin; once
    // decided, the next year's waits
    let birthdays = |c: &mut postgres::Client| -> Vec<String> {
        c.query(
            "SELECT to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || state
               FROM nudge.enrollments WHERE trigger = 'birthday' ORDER BY due_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(
        birthdays(&mut c),
        ["2026-03-05 09:00 sent", "2027-03-05 09:00 waiting"]
    );
    c.batch_execute("SELECT nudge.run_due('2027-03-05 09:00+00')")
        .unwrap();
    assert_eq!(
        birthdays(&mut c),
        [
            "2026-03-05 09:00 sent",
            "2027-03-05 09:00 sent",
            "2028-03-05 09:00 waiting"
        ]
    );

    // backtest of the live definition over the period: the same outcomes
    let replayed: BTreeMap<String, i64> = c
        .query(
            "SELECT outcome, journeys FROM nudge.backtest(
                 (SELECT definition FROM nudge.trigger_versions WHERE trigger = 'trial_ending'),
                 '2026-03-01', '2026-05-01', 'trial_ending')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lived: BTreeMap<String, i64> = c
        .query(
            "SELECT state, count(*) FROM nudge.enrollments WHERE trigger = 'trial_ending' GROUP BY 1
             UNION ALL SELECT 'entered', count(*) FROM nudge.enrollments WHERE trigger = 'trial_ending'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(replayed, lived);
}

/// Segment entry: a journey starts when a user starts matching (a write of
/// their profile, or an event the trigger re-checks on), exactly once
/// however many statements see the change; who was there when the trigger was
/// defined starts one only with backfill, which explain says.
#[test]
fn a_segment_entry_starts_one_journey_per_entry() {
    let db = fresh_db("nudge_it_flow_segment");
    let mut c = connect(&db);
    c.batch_execute(
        r#"
        SET timezone = 'UTC';
        SELECT nudge.define_template('vip', 'Welcome to VIP, {{ event.name }}', '<p>vip</p>');
        INSERT INTO nudge.profiles (user_id, email, attrs)
        SELECT 'u' || i, 'u' || i || '@example.com', jsonb_build_object('ltv', 100, 'name', 'U' || i)
          FROM generate_series(1, 30) i;
        INSERT INTO nudge.profiles (user_id, email, attrs) VALUES ('old', 'old@example.com', '{"ltv": 900}');
        SELECT nudge.define_trigger('vip', '{"on": {"segment_entered": {"ltv": {"gte": 500}}, "recheck_on": ["purchased"]},
                                              "wait": "1 hour", "template": "vip"}');
        SELECT nudge.define_trigger('lapsed', '{"on": {"segment_exited": {"ltv": {"gte": 500}}}, "template": "vip"}');
        "#,
    )
    .unwrap();
    let journeys = |c: &mut postgres::Client, t: &str| -> Vec<String> {
        c.query(
            "SELECT user_id FROM nudge.enrollments WHERE trigger = $1 ORDER BY user_id, entered_at",
            &[&t],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // already in the segment when it was defined: no journey by default
    assert!(journeys(&mut c, "vip").is_empty());

    // u1 and u2 pass 500 in one statement; u3 stays below
    c.batch_execute(
        "UPDATE nudge.profiles SET attrs = attrs || '{\"ltv\": 600}' WHERE user_id IN ('u1', 'u2');
         UPDATE nudge.profiles SET attrs = attrs || '{\"ltv\": 200}' WHERE user_id = 'u3';",
    )
    .unwrap();
    assert_eq!(journeys(&mut c, "vip"), ["u1", "u2"]);
    // still inside: more writes start nothing, from ten sessions at once
    let writers: Vec<_> = (0..10)
        .map(|i| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut c = connect(&db);
                for _ in 0..5 {
                    c.execute(
                        "UPDATE nudge.profiles SET attrs = attrs || jsonb_build_object('ltv', 700 + $1::int) WHERE user_id IN ('u1', 'u4')",
                        &[&i],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // u4 entered once, under fifty writes of ten sessions
    assert_eq!(journeys(&mut c, "vip"), ["u1", "u2", "u4"]);
    let subject: String = c
        .query_one(
            "SELECT nudge.run_due(now() + interval '2 hours')::text",
            &[],
        )
        .map(|_| ())
        .and_then(|_| {
            c.query_one(
                "SELECT subject FROM nudge.outbox WHERE user_id = 'u2' AND trigger = 'vip'",
                &[],
            )
        })
        .unwrap()
        .get(0);
    assert_eq!(subject, "Welcome to VIP, U2");

    // leaving starts the other trigger's journey; coming back, a second vip one
    c.batch_execute(
        "UPDATE nudge.profiles SET attrs = attrs || '{\"ltv\": 50}' WHERE user_id = 'u2'",
    )
    .unwrap();
    assert_eq!(journeys(&mut c, "lapsed"), ["u2"]);
    c.batch_execute(
        "UPDATE nudge.profiles SET attrs = attrs || '{\"ltv\": 550}' WHERE user_id = 'u2'",
    )
    .unwrap();
    assert_eq!(journeys(&mut c, "vip"), ["u1", "u2", "u2", "u4"]);

    // a change the profile trigger did not see (a profile query would read
    // another table): the next purchase re-checks it
    c.batch_execute(
        "ALTER TABLE nudge.profiles DISABLE TRIGGER profiles_updated_segments;
         UPDATE nudge.profiles SET attrs = attrs || '{\"ltv\": 800}' WHERE user_id = 'u5';
         ALTER TABLE nudge.profiles ENABLE TRIGGER profiles_updated_segments;",
    )
    .unwrap();
    assert_eq!(journeys(&mut c, "vip").len(), 4);
    c.batch_execute("SELECT nudge.track('u5', 'purchased', '{}')")
        .unwrap();
    assert_eq!(journeys(&mut c, "vip"), ["u1", "u2", "u2", "u4", "u5"]);

    // backfill: who qualifies when the trigger is defined starts now, and
    // explain says so
    c.batch_execute(
        "SELECT nudge.define_trigger('vip_now', '{\"on\": {\"segment_entered\": {\"ltv\": {\"gte\": 500}}},
                                                  \"backfill\": \"qualifying_now\", \"template\": \"vip\"}')",
    )
    .unwrap();
    assert_eq!(journeys(&mut c, "vip_now"), ["old", "u1", "u2", "u4", "u5"]);
    let lines: Vec<String> = c
        .query(
            "SELECT step || ': ' || coalesce(detail, '') FROM nudge.explain('vip_now', 'old')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("backfill: in the segment when the trigger was defined")),
        "{lines:?}"
    );
    // forget erases membership too
    c.batch_execute("SELECT * FROM nudge.forget('u1')").unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.segment_members WHERE user_id = 'u1'"
        ),
        0
    );
}

/// A segment has no history to replay: backtest says so (22023).
#[test]
fn a_backtest_of_a_segment_entry_is_refused() {
    let db = fresh_db("nudge_it_flow_segment_bt");
    let mut c = connect(&db);
    let err = c
        .query(
            "SELECT * FROM nudge.backtest('{\"on\": {\"segment_entered\": {\"ltv\": {\"gte\": 1}}}, \"template\": \"t\"}',
                                          now() - interval '1 day', now())",
            &[],
        )
        .unwrap_err();
    let e = err.as_db_error().expect("a database error");
    assert_eq!(e.code().code(), "22023");
    assert!(
        e.message().contains("cannot be replayed"),
        "{}",
        e.message()
    );
}

/// Changes as events: an UPDATE that changes a watched column of a source
/// emits `<column>_changed`; one that sets the same value emits nothing; a
/// changed date moves the date journey; the application's UPDATE never fails
/// on our account.
#[test]
fn an_update_of_a_watched_column_is_an_event() {
    let db = fresh_db("nudge_it_flow_changes");
    let mut c = connect(&db);
    c.batch_execute(
        r#"
        SET timezone = 'UTC';
        CREATE SCHEMA app;
        CREATE TABLE app.accounts (id text PRIMARY KEY, customer text, plan text, trial_ends_at timestamptz,
                                   created_at timestamptz DEFAULT now(), tags json[]);
        SELECT nudge.add_source('app.accounts', 'customer', time_column => 'created_at', event_name => 'account_opened');
        -- json[] has no equality: the trigger compares text
        SELECT nudge.watch_changes('app.accounts', ARRAY['plan', 'trial_ends_at', 'tags']);
        INSERT INTO nudge.profiles (user_id, email, timezone) VALUES ('ann', 'ann@example.com', 'Europe/Berlin'),
                                                                    ('bob', 'bob@example.com', 'Europe/Berlin');
        SELECT nudge.define_template('upgraded', 'Welcome to {{ event.plan }} (was {{ event.previous.plan }})', '<p>up</p>');
        SELECT nudge.define_template('ending', 'Trial ends {{ event.trial_ends_at | in_time_zone | date: "%b %d" }}', '<p>e</p>');
        SELECT nudge.define_trigger('upgraded', '{"on": {"changed": "plan", "where": {"plan": {"eq": "pro"}}}, "template": "upgraded"}');
        SELECT nudge.define_trigger('trial_ending', '{"on": {"changed": "trial_ends_at", "key": "id", "date": "trial_ends_at",
                                                              "offset": "-3 days", "at": "09:00"},
                                                       "template": "ending", "expire_after": "never"}');
        INSERT INTO app.accounts (id, customer, plan) VALUES ('a1', 'ann', 'free'), ('b1', 'bob', 'free');
        "#,
    )
    .unwrap();
    // the same value, then another column: nothing
    c.batch_execute(
        "UPDATE app.accounts SET plan = 'free'; UPDATE app.accounts SET created_at = created_at;
         UPDATE app.accounts SET tags = ARRAY['{}'::json]; UPDATE app.accounts SET tags = ARRAY['{\"a\": 1}'::json];",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 0);
    // ann upgrades; both trials are set, then bob's is extended by a week
    for sql in [
        "UPDATE app.accounts SET plan = 'pro' WHERE id = 'a1'",
        "UPDATE app.accounts SET trial_ends_at = '2027-05-02 10:00+00'",
        "UPDATE app.accounts SET trial_ends_at = '2027-05-09 10:00+00' WHERE id = 'b1'",
    ] {
        c.batch_execute(sql).unwrap();
    }
    c.batch_execute("SELECT nudge.run_due(now())").unwrap();
    let subject: String = c
        .query_one(
            "SELECT subject FROM nudge.outbox WHERE trigger = 'upgraded'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(subject, "Welcome to pro (was free)");
    // the change is an event of the history (exits at send time, backtest read it)
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.all_events WHERE event = 'plan_changed' AND user_id = 'ann'"),
        1
    );
    // a savepoint rolled back takes back its own changes, not the others
    c.batch_execute(
        "BEGIN;
         UPDATE app.accounts SET plan = 'team' WHERE id = 'a1';
         SAVEPOINT s;
         UPDATE app.accounts SET plan = 'team' WHERE id = 'b1';
         ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.all_events WHERE event = 'plan_changed' AND props->>'plan' = 'team'"),
        1
    );
    // a partitioned table: its partitions' updates would fire no statement trigger
    let err = c
        .batch_execute(
            "CREATE TABLE app.parted (customer text, plan text) PARTITION BY LIST (plan);
             SELECT nudge.add_source('app.parted', 'customer', event_name => 'p');
             SELECT nudge.watch_changes('app.parted', ARRAY['plan']);",
        )
        .unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("0A000"), "{err:?}");
    let journeys: Vec<String> = c
        .query(
            "SELECT user_id || ' ' || to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || state
               FROM nudge.enrollments WHERE trigger = 'trial_ending' ORDER BY user_id, entered_at, id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // 29 April 09:00 CEST; bob's moved to 6 May (the first ended, by the change)
    assert_eq!(
        journeys,
        [
            "ann 2027-04-29 07:00 waiting",
            "bob 2027-04-29 07:00 exited",
            "bob 2027-05-06 07:00 waiting"
        ]
    );
    // an UPDATE of many rows, with odd values, goes through
    c.batch_execute(
        "INSERT INTO app.accounts (id, customer, plan) SELECT 'x' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'u' || i END, 'free'
           FROM generate_series(1, 5000) i;
         UPDATE app.accounts SET plan = CASE WHEN id LIKE 'x%' THEN 'pro' ELSE plan END,
                                 trial_ends_at = CASE WHEN id = 'x3' THEN 'infinity' ELSE trial_ends_at END;",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'upgraded'"
        ),
        1 + 5000 - 5000 / 7
    );
    // the columns are named in the events: renaming one is refused
    let err = c
        .batch_execute("ALTER TABLE app.accounts RENAME COLUMN plan TO tier")
        .unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("watched column"), "{message}");
    // no longer watched: no event
    c.batch_execute(
        "SELECT nudge.watch_changes('app.accounts', '{}');
         UPDATE app.accounts SET plan = 'free' WHERE id = 'a1'; UPDATE app.accounts SET plan = 'pro' WHERE id = 'a1';",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'upgraded' AND user_id = 'ann'"
        ),
        1
    );
}

/// A journey waiting at a step that a new version no longer has ends with
/// rule `definition`; a date out of range enters nothing and fails no INSERT.
#[test]
fn a_removed_step_ends_its_journeys_and_an_odd_date_enters_nothing() {
    let db = fresh_db("nudge_it_flow_edges");
    let mut c = connect(&db);
    c.batch_execute(
        r#"
        SET timezone = 'UTC';
        INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
        SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
        SELECT nudge.define_trigger('two', '{"on": {"event": "a"}, "steps": [{"template": "t"}, {"wait": "1 hour", "template": "t"}]}');
        SELECT nudge.track('u1', 'a', '{}', now() - interval '10 minutes');
        SELECT nudge.run_due(now());
        SELECT nudge.define_trigger('two', '{"on": {"event": "a"}, "template": "t"}');
        SELECT nudge.run_due(now() + interval '2 hours');
        SELECT nudge.define_trigger('dated', '{"on": {"event": "d", "date": "at", "offset": "12 hours"}, "template": "t"}');
        "#,
    )
    .unwrap();
    let (state, rule, reason): (String, String, String) = c
        .query_one(
            "SELECT state, rule, reason FROM nudge.enrollments WHERE trigger = 'two' AND step = 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!((state.as_str(), rule.as_str()), ("failed", "definition"));
    assert!(reason.contains("step 2 is no longer"), "{reason}");
    // a one-message journey due in three days, its trigger redefined as two
    // steps of a day: the waiting row is later than its own next step, and is
    // decided all the same (it was held back by that step, for ever)
    c.batch_execute(
        r#"
        SELECT nudge.define_trigger('later', '{"on": {"event": "b"}, "wait": "3 days", "template": "t"}');
        SELECT nudge.track('u1', 'b', '{}', now() - interval '1 minute');
        SELECT nudge.define_trigger('later', '{"on": {"event": "b"}, "steps": [{"wait": "1 day", "template": "t"}, {"wait": "1 day", "template": "t"}]}');
        SELECT nudge.run_due(now() + interval '3 days 1 hour');
        "#,
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'later' AND step = 0 AND state = 'sent'"),
        1
    );
    // a step inserted by a new version does not rename the older journeys'
    // steps in trigger_stats
    c.batch_execute(
        r#"
        SELECT nudge.define_trigger('named', '{"on": {"event": "n"}, "steps": [{"name": "first", "template": "t"}]}');
        SELECT nudge.track('u1', 'n', '{}', now() - interval '1 minute');
        SELECT nudge.run_due(now());
        SELECT nudge.define_trigger('named', '{"on": {"event": "n"}, "steps": [{"name": "intro", "template": "t"}, {"name": "first", "template": "t"}]}');
        "#,
    )
    .unwrap();
    let steps: Vec<String> = c
        .query(
            "SELECT step FROM nudge.trigger_stats WHERE trigger = 'named'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(steps, ["first"]);
    for odd in [
        "-5000-01-01",
        "+262143-12-31",
        "9999-12-31T23:00:00Z",
        "-300000000000",
        "soon",
    ] {
        c.execute(
            "SELECT nudge.track('u1', 'd', jsonb_build_object('at', $1::text))",
            &[&odd],
        )
        .unwrap();
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'dated'"
        ),
        0
    );
}

/// A date on the profile: set, it starts a journey at the next anniversary
/// (10:00 where the user lives); changed, it moves the waiting one; removed,
/// it ends it; written again unchanged, nothing. Who had one when the
/// trigger was defined starts only with backfill.
#[test]
fn a_date_on_the_profile_starts_moves_and_ends_its_journey() {
    let db = fresh_db("nudge_it_flow_profile_date");
    let mut c = connect(&db);
    c.batch_execute(
        r#"
        SET timezone = 'UTC';
        SELECT nudge.define_template('bday', 'Happy birthday', '<p>hi</p>');
        INSERT INTO nudge.profiles (user_id, email, timezone, attrs) VALUES
            ('old', 'old@example.com', 'Europe/Berlin', '{"birthday": "1980-07-01"}'),
            ('u1', 'u1@example.com', 'Europe/Berlin', '{}');
        SELECT nudge.define_trigger('birthday', '{"on": {"date": "profile.birthday", "every": "year", "at": "10:00"},
                                                  "template": "bday", "expire_after": "never"}');
        "#,
    )
    .unwrap();
    let journeys = |c: &mut postgres::Client, t: &str| -> Vec<String> {
        c.query(
            "SELECT user_id || ' ' || to_char(due_at AT TIME ZONE 'Europe/Berlin', 'MM-DD HH24:MI') || ' ' || state
               FROM nudge.enrollments WHERE trigger = $1 ORDER BY user_id, entered_at, id",
            &[&t],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert!(
        journeys(&mut c, "birthday").is_empty(),
        "no backfill by default"
    );
    for sql in [
        "UPDATE nudge.profiles SET attrs = '{\"birthday\": \"1990-06-15\"}' WHERE user_id = 'u1'",
        "UPDATE nudge.profiles SET attrs = '{\"birthday\": \"1990-06-15\", \"x\": 1}' WHERE user_id = 'u1'",
    ] {
        c.batch_execute(sql).unwrap();
    }
    assert_eq!(journeys(&mut c, "birthday"), ["u1 06-15 10:00 waiting"]);
    c.batch_execute(
        "UPDATE nudge.profiles SET attrs = '{\"birthday\": \"1990-08-20\"}' WHERE user_id = 'u1'",
    )
    .unwrap();
    assert_eq!(
        journeys(&mut c, "birthday"),
        ["u1 06-15 10:00 exited", "u1 08-20 10:00 waiting"]
    );
    c.batch_execute("UPDATE nudge.profiles SET attrs = '{}' WHERE user_id = 'u1'")
        .unwrap();
    assert_eq!(
        journeys(&mut c, "birthday"),
        ["u1 06-15 10:00 exited", "u1 08-20 10:00 exited"]
    );
    c.batch_execute(
        "SELECT nudge.define_trigger('birthday_now', '{\"on\": {\"date\": \"profile.birthday\", \"every\": \"year\"},
                                                      \"backfill\": \"qualifying_now\", \"template\": \"bday\"}')",
    )
    .unwrap();
    assert_eq!(
        journeys(&mut c, "birthday_now"),
        ["old 07-01 09:00 waiting"]
    );
}

/// The flow's steps decided by three passes at once in small batches give
/// what one pass at a time gives, caps included (a branch on the profile, so
/// that nothing is recorded between passes).
#[test]
fn concurrent_passes_decide_each_step_as_one_pass_does() {
    let setup = r#"
        SET timezone = 'UTC';
        SELECT nudge.configure('{"caps": [{"max": 2, "per": "1 day"}]}');
        SELECT nudge.define_template('c1', 'Your cart {{ event.cart_id }}', '<p>1</p>');
        SELECT nudge.define_template('c2', 'VIP: {{ event.cart_id }}', '<p>2</p>');
        SELECT nudge.define_template('c3', '10% off {{ event.cart_id }}', '<p>3</p>');
        SELECT nudge.define_trigger('cart_flow', '{
            "expire_after": "never",
            "on": {"event": "cart_added", "key": "cart_id"},
            "unless": [{"event": "purchased", "same_key": true}],
            "steps": [
                {"name": "reminder", "wait": "1 hour", "template": "c1"},
                {"name": "vip", "wait": "1 day", "template": "c2", "if": {"profile.vip": {"eq": true}}, "else": "discount"},
                {"name": "discount", "wait": "2 days", "template": "c3"}
            ]}');
        INSERT INTO nudge.profiles (user_id, email, attrs)
        SELECT 'u' || i, 'u' || i || '@example.com', jsonb_build_object('vip', i % 2 = 0) FROM generate_series(0, 39) i;
    "#;
    let events = history();
    let end = (events.last().unwrap().3 + 5 * 86_400) as f64;
    let loaded = |name: &str| -> String {
        let db = fresh_db(name);
        let mut c = connect(&db);
        c.batch_execute(setup).unwrap();
        load(&mut c, &events);
        db
    };
    let due_all = "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)";
    let left = |c: &mut postgres::Client| {
        count(
            c,
            &format!(
                "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'
                   AND due_at <= '{START}'::timestamptz + {end} * interval '1 second'"
            ),
        )
    };
    let one = loaded("nudge_it_flow_one");
    let mut c = connect(&one);
    while left(&mut c) > 0 {
        c.query_one(due_all, &[&START, &end]).unwrap();
    }
    let many = loaded("nudge_it_flow_many");
    let passes: Vec<_> = (0..3)
        .map(|_| {
            let db = many.clone();
            std::thread::spawn(move || {
                let mut c = connect(&db);
                loop {
                    c.query_one(
                        "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 15)",
                        &[&START, &end],
                    )
                    .unwrap();
                    let left = count(
                        &mut c,
                        &format!(
                            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'
                               AND due_at <= '{START}'::timestamptz + {end} * interval '1 second'"
                        ),
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
    let (one_j, one_m) = outcome(&one);
    let (many_j, many_m) = outcome(&many);
    same("journeys", &many_j, &one_j);
    same("messages", &many_m, &one_m);
    let by_rule: BTreeMap<String, i64> = c
        .query(
            "SELECT step || ' ' || state || ' ' || coalesce(rule, '-'), count(*) FROM nudge.enrollments GROUP BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for acted in ["1 sent -", "1 skipped branch", "2 sent -"] {
        assert!(
            by_rule.get(acted).copied().unwrap_or(0) > 0,
            "{acted}: {by_rule:?}"
        );
    }
    assert!(
        by_rule
            .iter()
            .any(|(k, n)| k.ends_with("suppressed cap") && *n > 0),
        "the cap acted on some step: {by_rule:?}"
    );
}
