//! Upgrade: a database created at 0.1.0, with a source, triggers and journeys,
//! updated to 0.2.0 with ALTER EXTENSION, ends with the same schema as a fresh
//! 0.2.0 install, and its data keeps working.
use nudge_integration::{connect, count, dsn, fresh_db};
use postgres::Client;

/// Everything in schema nudge that an install defines, as comparable text:
/// functions (arguments, security, settings), indexes, triggers, columns.
fn schema_of(c: &mut Client) -> Vec<String> {
    let q = "
        SELECT 'function ' || p.oid::regprocedure || ' definer=' || p.prosecdef
               || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
               || ' returns ' || pg_get_function_result(p.oid)
          FROM pg_proc p WHERE p.pronamespace = 'nudge'::regnamespace
           AND p.proname NOT LIKE '\\_profile%' AND p.proname NOT LIKE 'user\\_sql\\_%'
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'nudge'
        UNION ALL
        SELECT 'trigger ' || t.tgrelid::regclass || ' ' || pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid
         WHERE r.relnamespace = 'nudge'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT 'column ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
          FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
         WHERE r.relnamespace = 'nudge'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1";
    c.query(q, &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

fn version_of(c: &mut Client) -> String {
    c.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_nudge'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn upgrade_from_0_1_0_matches_a_fresh_install_and_keeps_working() {
    let fresh = fresh_db("nudge_it_upgrade_fresh");
    let mut f = connect(&fresh);
    assert_eq!(version_of(&mut f), "0.2.0");
    f.batch_execute("CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
                     SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();

    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "SET timezone = 'UTC';
         CREATE EXTENSION pg_nudge VERSION '0.1.0';
         CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_template('t', 'Hi', 'cart {{ event.cart }}');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\", \"key\": \"cart\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\", \"same_key\": true}], \"template\": \"t\"}');
         SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', '2026-01-01 10:00+00');
         SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', '2026-01-01 10:00+00');",
    )
    .unwrap();
    // the 0.1.0 library journaled every entry; this one (already loaded) does
    // not, so the lines 0.1.0 wrote are put back by hand
    c.batch_execute(
        "INSERT INTO nudge.journal (user_id, trigger, enrollment_id, at, step, detail)
         SELECT user_id, trigger, id, entered_at, 'entered', 'v1 key ' || key FROM nudge.enrollments",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.journal WHERE step = 'entered'"
        ),
        2
    );

    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE TO '0.2.0'")
        .unwrap();
    assert_eq!(version_of(&mut c), "0.2.0");
    let (upgraded, fresh_schema) = (schema_of(&mut c), schema_of(&mut f));
    let only_upgraded: Vec<&String> = upgraded
        .iter()
        .filter(|x| !fresh_schema.contains(x))
        .collect();
    let only_fresh: Vec<&String> = fresh_schema
        .iter()
        .filter(|x| !upgraded.contains(x))
        .collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "upgraded schema differs from a fresh install:\n  only upgraded: {only_upgraded:#?}\n  only fresh: {only_fresh:#?}"
    );

    // the journeys of 0.1.0 go on: the user's source (now captured by the new
    // trigger) closes one, run_due sends the other
    c.batch_execute(
        "INSERT INTO public.orders (customer, cart, at) VALUES ('u1', 'k1', '2026-01-01 10:30+00')",
    )
    .unwrap();
    let state: String = c
        .query_one(
            "SELECT state FROM nudge.enrollments WHERE user_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "exited");
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ('u2', 'u2@example.com');
                     SELECT nudge.run_due('2026-01-01 12:00+00')",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE user_id = 'u2'"
        ),
        1
    );
    // entered once in explain, though 0.1.0 wrote it to the journal
    let steps: Vec<String> = c
        .query("SELECT step FROM nudge.explain('cart', 'u1')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(steps, vec!["entered", "exited"]);
    // and a new event of a new user enters
    c.batch_execute(
        "SELECT nudge.track('u3', 'cart_added', '{\"cart\": \"k3\"}', '2026-01-01 11:00+00')",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE user_id = 'u3'"
        ),
        1
    );
    // the batch ack of 0.2.0 works on the upgraded outbox
    c.batch_execute("SELECT nudge.claim(10)").unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT nudge.ack_many(array_agg(id))::bigint FROM nudge.outbox"
        ),
        1
    );
}
