//! Upgrade: a database created by a released install script (0.1.0, 0.2.0),
//! with sources, triggers, user SQL and journeys, updated with ALTER
//! EXTENSION, ends with the same schema as a fresh install (functions with
//! their bodies, settings and grants, columns, constraints, views, grants),
//! and its data keeps working.
use nudge_integration::{connect, count, drop_slots, dsn, fresh_db};
use postgres::Client;

/// Everything in schema nudge that an install defines, as comparable text:
/// functions (arguments, security, settings), indexes, triggers, columns.
fn schema_of(c: &mut Client) -> Vec<String> {
    let q = "
        SELECT 'function ' || p.oid::regprocedure || ' definer=' || p.prosecdef
               || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
               || ' returns ' || pg_get_function_result(p.oid)
               || ' acl=' || (SELECT coalesce(string_agg(a.grantee::regrole || '=' || a.privilege_type, ',' ORDER BY a.grantee::regrole::text, a.privilege_type), '')
                                FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a)
               || ' body=' || md5(regexp_replace(p.prosrc, '\\s+', ' ', 'g'))
          FROM pg_proc p WHERE p.pronamespace = 'nudge'::regnamespace
           AND p.proname NOT LIKE '\\_profile%' AND p.proname NOT LIKE '\\_user\\_sql\\_%'
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'nudge'
        UNION ALL
        SELECT 'trigger ' || t.tgrelid::regclass || ' ' || pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid
         WHERE r.relnamespace = 'nudge'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT 'column ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' default ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
          FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE r.relnamespace = 'nudge'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT 'constraint ' || c.conrelid::regclass || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
          FROM pg_constraint c WHERE c.connamespace = 'nudge'::regnamespace
        UNION ALL
        SELECT 'grants ' || r.oid::regclass || ' ' || (
                   SELECT coalesce(string_agg(a.grantee::regrole || '=' || a.privilege_type, ',' ORDER BY a.grantee::regrole::text, a.privilege_type), '')
                     FROM aclexplode(coalesce(r.relacl, acldefault(CASE r.relkind WHEN 'S' THEN 's'::\"char\" ELSE 'r'::\"char\" END, r.relowner))) a)
          FROM pg_class r WHERE r.relnamespace = 'nudge'::regnamespace AND r.relkind IN ('r', 'v', 'S')
        UNION ALL
        SELECT 'view ' || r.oid::regclass || ' ' || pg_get_viewdef(r.oid)
          FROM pg_class r WHERE r.relnamespace = 'nudge'::regnamespace AND r.relkind = 'v'
        UNION ALL
        SELECT 'schema nudge ' || (SELECT coalesce(string_agg(a.grantee::regrole || '=' || a.privilege_type, ',' ORDER BY a.grantee::regrole::text, a.privilege_type), '')
                                     FROM aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a)
          FROM pg_namespace n WHERE n.nspname = 'nudge'
        UNION ALL
        SELECT 'event trigger ' || e.evtname || ' ' || e.evtevent || ' ' || e.evtfoid::regproc || ' ' || coalesce(e.evttags::text, '')
          FROM pg_event_trigger e
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

const CURRENT: &str = "0.10.0";

/// Prints only the differences.
fn assert_same_schema(upgraded: &mut Client, fresh: &mut Client) {
    let (upgraded, fresh_schema) = (schema_of(upgraded), schema_of(fresh));
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
}

#[test]
fn upgrade_from_0_1_0_matches_a_fresh_install_and_keeps_working() {
    let fresh = fresh_db("nudge_it_upgrade_fresh");
    let mut f = connect(&fresh);
    assert_eq!(version_of(&mut f), CURRENT);
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

    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);

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

/// From the released 0.2.0 install script, with SQL that a role defined
/// (audience, context, profile query) under 0.2.0's rules: its functions are
/// brought under today's (no EXECUTE for PUBLIC, pg_temp last, settings
/// recorded) and still run, as their definer.
#[test]
fn upgrade_from_0_2_0_secures_user_sql_and_keeps_working() {
    let fresh = fresh_db("nudge_it_upgrade_fresh2");
    let mut f = connect(&fresh);
    f.batch_execute("CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
                     SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();

    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade2 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade2")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade2", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "SET timezone = 'UTC';
         CREATE EXTENSION pg_nudge VERSION '0.2.0';
         CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         CREATE TABLE public.customers (id text, mail text, points int);
         INSERT INTO public.customers VALUES ('u1', 'u1@example.com', 7);
         SELECT nudge.define_template('t', 'Hi', '{{ context.p.points }} points');
         SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"template\": \"t\"}');",
    )
    .unwrap();
    // what 0.2.0's library made of an audience, a context query and a profile
    // query (this library writes today's shape, so the old one is laid by hand)
    c.batch_execute(
        "UPDATE nudge.trigger_versions SET definition = definition
             || '{\"audience_sql\": \"SELECT count(*) > 0 FROM customers WHERE id = $1\",
                  \"context\": {\"p\": \"SELECT points FROM customers WHERE id = $1\"}}';
         CREATE FUNCTION nudge._user_sql_1(text) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER
             SET search_path FROM CURRENT AS
             $q$SELECT coalesce((SELECT q.* FROM (SELECT count(*) > 0 FROM customers WHERE id = $1) AS q LIMIT 1), false)$q$;
         CREATE FUNCTION nudge._user_sql_2(text) RETURNS jsonb LANGUAGE sql STABLE SECURITY DEFINER
             SET search_path FROM CURRENT AS
             $q$SELECT CASE count(*) WHEN 0 THEN NULL WHEN 1 THEN (array_agg(to_jsonb(q)))[1] ELSE jsonb_agg(to_jsonb(q)) END
                  FROM (SELECT points FROM customers WHERE id = $1) AS q$q$;
         INSERT INTO nudge.user_sql (trigger, version, part, function)
         VALUES ('x', 1, 'audience_sql', 'nudge._user_sql_1'), ('x', 1, 'context.p', 'nudge._user_sql_2');
         SELECT setval('nudge.user_sql_id', 2);
         CREATE OR REPLACE FUNCTION nudge._profile(text) RETURNS jsonb LANGUAGE sql STABLE SECURITY DEFINER
             SET search_path FROM CURRENT SET statement_timeout = '5s' AS
             $q$SELECT to_jsonb(p) FROM (SELECT mail AS email FROM customers WHERE id = $1) AS p LIMIT 1$q$;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_proc WHERE proname LIKE '\\_user\\_sql\\_%' AND has_function_privilege('public', oid, 'EXECUTE')"),
        2,
        "0.2.0 left its generated functions executable by PUBLIC"
    );
    // what 0.2.0 let nudge_admin plant in our schema stops the update, named
    c.batch_execute(
        "CREATE FUNCTION nudge.jsonb_build_object(a text, b text) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb'",
    )
    .unwrap();
    let err = c
        .batch_execute("ALTER EXTENSION pg_nudge UPDATE")
        .unwrap_err();
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(db_err.code().code(), "42501");
    assert!(
        db_err
            .message()
            .contains("function jsonb_build_object(text,text)"),
        "{}",
        db_err.message()
    );
    c.batch_execute("DROP FUNCTION nudge.jsonb_build_object(text, text)")
        .unwrap();
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);

    let open = count(
        &mut c,
        "SELECT count(*) FROM pg_proc p, nudge.user_sql u
          WHERE p.oid = to_regprocedure(u.function || '(text)')
            AND (has_function_privilege('public', p.oid, 'EXECUTE')
                 OR has_function_privilege('nudge_mailer', p.oid, 'EXECUTE')
                 OR p.proconfig[1] NOT LIKE '%pg_temp' OR u.config IS DISTINCT FROM p.proconfig)",
    );
    assert_eq!(open, 0, "a generated function was left as 0.2.0 made it");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.user_sql"),
        3,
        "the audience, the context and the profile query are registered"
    );
    c.batch_execute(
        "SELECT nudge.track('u1', 'e', '{}', now() - interval '1 minute');
         SELECT nudge.run_due();",
    )
    .unwrap();
    let r = c
        .query_one("SELECT recipient, html FROM nudge.outbox", &[])
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "u1@example.com");
    assert_eq!(r.get::<_, String>(1), "7 points");
}

/// From the released 0.3.0 install script: a journey waiting across the
/// update still goes, enrollments gain their retry count, and the new
/// functions (retention, worker_status's counters) are there as on a fresh install.
#[test]
fn upgrade_from_0_3_0_keeps_waiting_journeys_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh3");
    let mut f = connect(&fresh);
    f.batch_execute("CREATE TABLE public.orders (id serial, customer text, at timestamptz);
                     SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();

    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade3 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade3")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade3", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.3.0';
         CREATE TABLE public.orders (id serial, customer text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_template('t', 'Thanks', '<p>thanks</p>');
         SELECT nudge.define_trigger('thanks', '{\"on\": {\"event\": \"purchased\"}, \"wait\": \"1 hour\", \"template\": \"t\"}');
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
         INSERT INTO public.orders (customer, at) VALUES ('u1', now() - interval '2 hours');",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'"
        ),
        1
    );
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);

    assert_eq!(count(&mut c, "SELECT nudge.run_due()::bigint"), 1);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'sent' AND attempts = 0"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.worker_status() WHERE failed >= 0 AND retried >= 0"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT sum(deleted)::bigint FROM nudge.apply_retention()"
        ),
        0,
        "nothing is older than the retention"
    );
}

/// From the released 0.4.0 install script: a message written before the
/// update and held for later keeps its times, is re-checked before it can be
/// claimed, and the outbox has the new columns and status as on a fresh install.
#[test]
fn upgrade_from_0_4_0_rechecks_held_messages_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh4");
    let mut f = connect(&fresh);
    f.batch_execute("CREATE TABLE public.orders (id serial, customer text, at timestamptz);
                     SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();

    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade4 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade4")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade4", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.4.0';
         CREATE TABLE public.orders (id serial, customer text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_template('t', 'Thanks', '<p>thanks</p>');
         SELECT nudge.define_trigger('thanks', '{\"on\": {\"event\": \"purchased\"}, \"template\": \"t\"}');
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
         INSERT INTO public.orders (customer, at) VALUES ('u1', now() - interval '2 hours'), ('u2', now() - interval '2 hours');
         -- messages written by 0.4.0 (its library is gone): u2's waits for a retry
         INSERT INTO nudge.outbox (message_key, trigger, trigger_version, enrollment_id, user_id, recipient,
                                   subject, html, created_at, available_at)
         SELECT 'k' || e.user_id, e.trigger, e.trigger_version, e.id, e.user_id, e.user_id || '@example.com', 'Thanks', 'x',
                CASE WHEN e.user_id = 'u2' THEN now() - interval '2 hours' ELSE now() END,
                CASE WHEN e.user_id = 'u2' THEN now() + interval '1 hour' ELSE now() END
           FROM nudge.enrollments e;
         UPDATE nudge.enrollments SET state = 'sent';",
    )
    .unwrap();
    // this server's library does not decide against the old schema (it would
    // set every message aside): it says what to do
    let refused = c.query("SELECT nudge.run_due()", &[]).unwrap_err();
    assert_eq!(refused.code().map(|s| s.code()), Some("55000"), "{refused}");
    let message = refused.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("has pg_nudge 0.4.0"), "{message}");
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);

    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE scheduled_at = available_at AND checked_at = created_at"
        ),
        2
    );
    // u1's message was checked when written; u2's, once its hour has passed,
    // only after run_due has looked at it again
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.claim(10)"), 1);
    c.batch_execute("UPDATE nudge.outbox SET available_at = now() WHERE user_id = 'u2'")
        .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.claim(10)"), 0);
    c.batch_execute("SELECT nudge.run_due()").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.claim(10)"), 1);
}

/// From the released 0.5.0 install script: the application's INSERTs into a
/// source go on between installing this library and the update (capture must
/// not write the new columns into the old schema); after the update every
/// decided journey has its rule, and the schema is a fresh install's.
#[test]
fn upgrade_from_0_5_0_keeps_capturing_and_gives_every_journey_its_rule() {
    let fresh = fresh_db("nudge_it_upgrade_fresh5");
    let mut f = connect(&fresh);
    f.batch_execute("CREATE TABLE public.orders (id serial, customer text, at timestamptz);
                     SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased')")
        .unwrap();

    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade5 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade5")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade5", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.5.0';
         CREATE TABLE public.orders (id serial, customer text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\"}], \"reentry\": \"once\", \"template\": \"t\"}');
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');",
    )
    .unwrap();
    // the 0.5.0 schema, this library: journeys open, exit and are refused
    // re-entry at capture, and the application's INSERT goes through
    c.batch_execute(
        "SELECT nudge.track(u, 'cart_added', '{}', now() - interval '3 hours') FROM unnest(ARRAY['u1', 'u2']) u;
         INSERT INTO public.orders (customer, at) VALUES ('u1', now() - interval '150 minutes');
         SELECT nudge.track('u1', 'cart_added', '{}', now() - interval '140 minutes');",
    )
    .unwrap();
    // what 0.5.0 decided for u2 (its library is gone): capped
    c.batch_execute(
        "UPDATE nudge.enrollments SET state = 'suppressed', reason = 'cap: 1 per 1 day (global)' WHERE user_id = 'u2';
         INSERT INTO nudge.outbox (message_key, trigger, trigger_version, enrollment_id, user_id, recipient, subject, html, status, rule)
         SELECT 'k', 'cart', 1, id, 'u2', 'u2@example.com', 'Hi', 'x', 'cancelled', 'suppressed' FROM nudge.enrollments WHERE user_id = 'u2';
         -- 0.5.0 suppressed an address for an unsubscribe
         INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('u1@example.com', 'u1', 'unsubscribed');",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.journal WHERE step IN ('exited', 'not entered')"
        ),
        2
    );
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);
    let rules: Vec<(String, String)> = c
        .query(
            "SELECT user_id || ' ' || state, coalesce(rule, '-') FROM nudge.enrollments
             UNION ALL SELECT 'journal ' || step, coalesce(rule, '-') FROM nudge.journal
             UNION ALL SELECT 'outbox ' || status, rule FROM nudge.outbox ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expect = [
        ("journal exited", "exit"),
        ("journal not entered", "reentry"),
        ("outbox cancelled", "suppression"),
        ("u1 exited", "exit"),
        ("u2 suppressed", "cap"),
    ];
    assert_eq!(
        rules,
        expect
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    // that unsubscribe is consent now: receipts would still reach u1
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.subscriptions WHERE user_id = 'u1' AND topic = 'all' AND status = 'unsubscribed'"),
        1
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.suppressions"), 0);
    // and capture now writes the rule itself
    c.batch_execute("INSERT INTO nudge.profiles (user_id, email) VALUES ('u3', 'u3@example.com');
                     SELECT nudge.track('u3', 'cart_added', '{}', now() - interval '20 minutes');
                     INSERT INTO public.orders (customer, at) VALUES ('u3', now() - interval '10 minutes');")
        .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE user_id = 'u3' AND rule = 'exit'"
        ),
        1
    );
}

#[test]
fn upgrade_from_0_6_0_takes_gateway_batches_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh6");
    let mut f = connect(&fresh);
    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade6 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade6")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade6", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.6.0';
         SELECT nudge.track('u1', 'cart_added', '{}', now() - interval '1 hour');",
    )
    .unwrap();
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);
    // the new way in works on the upgraded schema, and a replay changes nothing
    let ingest = "SELECT stored, replayed FROM nudge.ingest('segment', ARRAY['m1', 'm1', NULL], ARRAY['u1', 'u1', 'u2'],
                      ARRAY['viewed', 'viewed', 'viewed'], ARRAY[now(), now(), now()], ARRAY['{}', '{}', '{}']::jsonb[])";
    let row = c.query_one(ingest, &[]).unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (2, 1));
    let row = c.query_one(ingest, &[]).unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.events WHERE event = 'viewed'"
        ),
        3
    );
}

#[test]
fn upgrade_from_0_7_0_captures_from_the_wal_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh7");
    let mut f = connect(&fresh);
    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade7 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade7")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade7", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.7.0';
         CREATE TABLE public.orders (id serial, customer text, cart text, at timestamptz);
         SELECT nudge.add_source('public.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_template('t', 'Hi', 'cart {{ event.cart }}');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\", \"key\": \"cart\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\", \"same_key\": true}], \"template\": \"t\"}');
         SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '2 hours');",
    )
    .unwrap();
    // the library is already 0.8.0: before the update, its worker passes and
    // capture find no WAL state and go on as before
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 0);
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);
    // the upgraded database captures from the WAL: the order closes the
    // journey 0.7.0 opened, through the slot
    c.query_one("SELECT nudge.set_capture('wal')", &[]).unwrap();
    c.batch_execute(
        "SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', now() - interval '2 hours');
         INSERT INTO public.orders (customer, cart, at) VALUES ('u1', 'k1', now() - interval '90 minutes');",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT nudge.capture_pending()"), 2);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting'"
        ),
        1
    );
    drop_slots("nudge_it_upgrade7");
}

#[test]
fn upgrade_from_0_8_0_runs_journeys_of_steps_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh8");
    let mut f = connect(&fresh);
    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade8 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade8")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade8", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.8.0';
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
         SELECT nudge.define_template('t', 'Hi', 'cart {{ event.cart }}');
         SELECT nudge.define_template('t2', 'Again', 'cart {{ event.cart }}');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\", \"key\": \"cart\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\", \"same_key\": true}], \"template\": \"t\"}');",
    )
    .unwrap();
    // the library is already 0.9.0: capture into the 0.8.0 schema (whose
    // unique key has no step) still enrolls, and the application's INSERT goes on
    c.batch_execute(
        "SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '2 hours');
         SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '2 hours');",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 1);
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);
    // the journey from 0.8.0 is step 0 of a one-step journey; a trigger of
    // two steps goes step by step
    c.batch_execute(
        "SELECT nudge.define_trigger('flow', '{\"on\": {\"event\": \"cart_added\"}, \"steps\": [
             {\"wait\": \"1 hour\", \"template\": \"t\"}, {\"wait\": \"1 hour\", \"template\": \"t2\"}]}');
         SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', now() - interval '3 hours');
         SELECT nudge.run_due(now());
         SELECT nudge.run_due(now());",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE user_id = 'u1'"
        ),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE trigger = 'flow' AND user_id = 'u2'"
        ),
        2
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.trigger_stats WHERE trigger = 'flow' AND sent = 1"
        ),
        2
    );
}

#[test]
fn upgrade_from_0_9_0_claims_through_the_new_claim_and_matches_a_fresh_install() {
    let fresh = fresh_db("nudge_it_upgrade_fresh9");
    let mut f = connect(&fresh);
    let mut admin = connect(&dsn());
    admin
        .batch_execute("DROP DATABASE IF EXISTS nudge_it_upgrade9 WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE nudge_it_upgrade9")
        .unwrap();
    let db = format!("{} dbname=nudge_it_upgrade9", dsn());
    let mut c = connect(&db);
    c.batch_execute(
        "CREATE EXTENSION pg_nudge VERSION '0.9.0';
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
         SELECT nudge.define_template('t', 'Hi', 'cart {{ event.cart }}');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\", \"key\": \"cart\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\", \"same_key\": true}], \"template\": \"t\"}');
         -- a source whose name ends like a Citus shard's
         CREATE TABLE orders_2026 (customer text, cart text, at timestamptz DEFAULT now());
         SELECT nudge.add_source('orders_2026', 'customer', time_column => 'at', event_name => 'purchased');",
    )
    .unwrap();
    // the library is already 0.10.0 (which asks whether a table is a Citus
    // shard): capture into the 0.9.0 schema goes on, and so do the inserts
    c.batch_execute(
        "SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '2 hours');
         SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', now() - interval '2 hours');
         INSERT INTO orders_2026 (customer, cart, at) VALUES ('u2', 'k2', now() - interval '90 minutes');",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 2);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited'"
        ),
        1
    );
    c.batch_execute("ALTER EXTENSION pg_nudge UPDATE").unwrap();
    assert_eq!(version_of(&mut c), CURRENT);
    assert_same_schema(&mut c, &mut f);
    // the journey from 0.9.0 is sent, claimed through the claim of 0.10.0
    // (src/claim.rs), acked once
    assert_eq!(count(&mut c, "SELECT nudge.run_due(now())::bigint"), 1);
    let id: i64 = c
        .query_one("SELECT id FROM nudge.claim(10, '1 minute', 'up')", &[])
        .unwrap()
        .get(0);
    assert!(c
        .query_one("SELECT nudge.ack($1)", &[&id])
        .unwrap()
        .get::<_, bool>(0));
    assert!(!c
        .query_one("SELECT nudge.ack($1)", &[&id])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'sent' AND user_id = 'u1'"
        ),
        1
    );
}
