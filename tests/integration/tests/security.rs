//! docs/security.md, claim by claim: each test attacks pg_nudge as the role
//! that would, over a real login, and checks that the attack gets nowhere.
//! Every attack here worked against 0.2.0.

use nudge_integration::{connect, connect_as, count, sqlstate, with_roles};
use postgres::Client;

/// A function in `schema` that records who ran it (in `schema.seen`, open to
/// everyone) and tries to make `role` a superuser: what an attacker would
/// plant where privileged code might call it.
fn plant_probe(c: &mut Client, schema: &str, role: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {schema}.seen (who text, what text);
         GRANT INSERT, SELECT ON {schema}.seen TO PUBLIC;
         GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
         CREATE FUNCTION {schema}.probe(what text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
         BEGIN
             INSERT INTO {schema}.seen VALUES (current_user, what);
             BEGIN
                 EXECUTE 'ALTER ROLE {role} SUPERUSER';
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
             RETURN true;
         END $f$;
         GRANT EXECUTE ON FUNCTION {schema}.probe(text) TO PUBLIC;"
    ))
    .unwrap();
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

fn seen(c: &mut Client, schema: &str) -> Vec<String> {
    c.query(
        &format!("SELECT who || ':' || what FROM {schema}.seen ORDER BY 1"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

const TEMPLATE: &str = "SELECT nudge.define_template('t', 'Hi', '<p>hi</p>')";

#[test]
fn admin_cannot_create_in_our_schema_hook_our_tables_or_forge_the_catalog() {
    let db = with_roles("sec_a");
    let mut a = connect_as(&db, "sec_a_admin");
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"template\": \"t\",
            \"audience_sql\": \"SELECT true\"}')",
    )
    .unwrap();
    let attacks = [
        // a function our privileged code would find first
        "CREATE FUNCTION nudge.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT pg_catalog.now()'",
        "CREATE TABLE nudge.evil (x int)",
        // a trigger that the worker (a superuser) would fire
        "CREATE TRIGGER evil BEFORE INSERT ON nudge.outbox FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "TRUNCATE nudge.journal",
        // rows that name functions or relations that privileged code uses
        "UPDATE nudge.user_sql SET function = 'pg_catalog.pg_read_file'",
        "INSERT INTO nudge.sources (source, user_column, event_name) VALUES ('pg_authid', 'rolname', 'x')",
        "UPDATE nudge.trigger_versions SET definition = definition",
        "UPDATE nudge.triggers SET owner = 'postgres'",
    ];
    for sql in attacks {
        assert_eq!(
            sqlstate(a.batch_execute(sql)),
            "42501",
            "as nudge_admin: {sql}"
        );
    }
    // what it is there for still works
    a.batch_execute(
        "CREATE TABLE sec_a_admin.orders (customer text, at timestamptz);
         SELECT nudge.add_source('sec_a_admin.orders', 'customer', time_column => 'at', event_name => 'purchased');
         INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
         SELECT nudge.pause_trigger('x'); SELECT nudge.resume_trigger('x');
         SELECT nudge.set_profile_query('SELECT p.email FROM nudge.profiles p WHERE p.user_id = $1');
         SELECT nudge.drop_source('sec_a_admin.orders');",
    )
    .unwrap();
    let mut su = connect(&db);
    let privileges = count(
        &mut su,
        "SELECT count(*) FROM pg_class c
          WHERE c.relnamespace = 'nudge'::regnamespace AND c.relkind IN ('r', 'v', 'S')
            AND (has_table_privilege('nudge_admin', c.oid, 'TRIGGER')
                 OR has_table_privilege('nudge_admin', c.oid, 'TRUNCATE')
                 OR has_table_privilege('nudge_admin', c.oid, 'REFERENCES'))",
    );
    assert_eq!(
        privileges, 0,
        "TRIGGER, TRUNCATE or REFERENCES granted to nudge_admin"
    );
    let create: bool = su
        .query_one(
            "SELECT has_schema_privilege('nudge_admin', 'nudge', 'CREATE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!create, "nudge_admin may create in schema nudge");
}

#[test]
fn a_generated_function_made_security_invoker_is_refused_not_run_by_the_worker() {
    let db = with_roles("sec_b");
    let mut a = connect_as(&db, "sec_b_admin");
    plant_probe(&mut a, "sec_b_admin", "sec_b_admin");
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"template\": \"t\",
            \"audience_sql\": \"SELECT sec_b_admin.probe($1)\"}')",
    )
    .unwrap();
    let mut su = connect(&db);
    let function: String = su
        .query_one(
            "SELECT function FROM nudge.user_sql WHERE trigger = 'x'",
            &[],
        )
        .unwrap()
        .get(0);
    // the definer owns its function, so it can change its security
    a.batch_execute(&format!("ALTER FUNCTION {function}(text) SECURITY INVOKER"))
        .unwrap();
    su.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
         SELECT nudge.track('u1', 'e', '{}', now() - interval '1 minute');
         SELECT nudge.run_due();",
    )
    .unwrap();
    assert!(
        !is_superuser(&mut su, "sec_b_admin"),
        "the admin made itself superuser"
    );
    assert!(
        !seen(&mut su, "sec_b_admin")
            .iter()
            .any(|s| s.starts_with("postgres")),
        "the admin's code ran as the superuser: {:?}",
        seen(&mut su, "sec_b_admin")
    );
    let reason: String = su
        .query_one(
            "SELECT state || ': ' || reason FROM nudge.enrollments WHERE trigger = 'x'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        reason.starts_with("failed") && reason.contains("no longer SECURITY DEFINER"),
        "{reason}"
    );
}

#[test]
fn user_sql_runs_as_its_definer_and_what_it_sets_does_not_outlive_it() {
    let db = with_roles("sec_c");
    let mut a = connect_as(&db, "sec_c_admin");
    plant_probe(&mut a, "sec_c_admin", "sec_c_admin");
    // functions that privileged code would call if the path it runs with were
    // the admin's: now() (every pass), jsonb_build_object, unnest
    a.batch_execute(
        "CREATE FUNCTION sec_c_admin.now() RETURNS timestamptz LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_c_admin.probe('now'); SELECT pg_catalog.now() $f$;
         CREATE FUNCTION sec_c_admin.jsonb_build_object(text, text, text, text) RETURNS jsonb LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_c_admin.probe('jsonb_build_object'); SELECT pg_catalog.jsonb_build_object($1, $2, $3, $4) $f$;
         CREATE FUNCTION sec_c_admin.unnest(text[]) RETURNS SETOF text LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_c_admin.probe('unnest'); SELECT pg_catalog.unnest($1) $f$;
         CREATE FUNCTION sec_c_admin.switch(u text) RETURNS text LANGUAGE plpgsql VOLATILE AS $f$
         BEGIN
             PERFORM sec_c_admin.probe('context');
             PERFORM pg_catalog.set_config('search_path', 'sec_c_admin, pg_catalog', false);
             RETURN 'switched';
         END $f$;",
    )
    .unwrap();
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"template\": \"t\",
            \"context\": {\"s\": \"SELECT sec_c_admin.switch($1) AS s\"}}')",
    )
    .unwrap();
    let mut su = connect(&db);
    su.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
         SELECT nudge.track('u1', 'e', '{}', now() - interval '2 minutes');
         SELECT nudge.run_due();
         SELECT nudge.track('u2', 'e', '{}', now() - interval '1 minute');
         SELECT nudge.run_due();",
    )
    .unwrap();
    assert!(
        !is_superuser(&mut su, "sec_c_admin"),
        "the admin made itself superuser"
    );
    // the context query ran, as its definer, and nothing else of the admin's did
    assert_eq!(
        seen(&mut su, "sec_c_admin"),
        vec!["sec_c_admin:context", "sec_c_admin:context"]
    );
    assert_eq!(count(&mut su, "SELECT count(*) FROM nudge.outbox"), 2);
    // the superuser's own session path is what it was
    let path: String = su.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "\"$user\", public");
}

#[test]
fn a_writers_temporary_table_never_shadows_what_a_definer_named() {
    let db = with_roles("sec_d");
    let mut a = connect_as(&db, "sec_d_admin");
    // the definer means its own table vip (empty: nobody is in the audience)
    a.batch_execute(
        "CREATE TABLE sec_d_admin.vip (id text);
         SET search_path = sec_d_admin;",
    )
    .unwrap();
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"wait\": \"1 hour\", \"template\": \"t\",
            \"audience_sql\": \"SELECT count(*) > 0 FROM vip WHERE id = $1\"}')",
    )
    .unwrap();
    // capture runs the audience query in the writer's session, at entry
    let mut w = connect_as(&db, "sec_d_writer");
    w.batch_execute(
        "CREATE TEMP TABLE vip (id text);
         INSERT INTO vip VALUES ('w1');
         SELECT nudge.track('w1', 'e');",
    )
    .unwrap();
    let mut su = connect(&db);
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM nudge.enrollments WHERE user_id = 'w1'"
        ),
        0,
        "the writer's temporary table answered the definer's audience query"
    );
    let config: Vec<String> = su
        .query_one("SELECT config FROM nudge.user_sql WHERE trigger = 'x'", &[])
        .unwrap()
        .get(0);
    assert_eq!(config, vec!["search_path=pg_catalog, sec_d_admin, pg_temp"]);
}

#[test]
fn overloads_planted_in_public_are_never_called_by_privileged_code() {
    let db = with_roles("sec_e");
    // the database owner owns schema public (PostgreSQL 15) and plants better
    // matches than pg_catalog's for calls our code makes (CVE-2018-1058)
    let mut o = connect_as(&db, "sec_e_owner");
    o.batch_execute("CREATE SCHEMA sec_e_owner").unwrap();
    plant_probe(&mut o, "sec_e_owner", "sec_e_owner");
    o.batch_execute(
        "CREATE FUNCTION public.jsonb_build_object(text, text, text, text) RETURNS jsonb LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_e_owner.probe('jsonb_build_object'); SELECT pg_catalog.jsonb_build_object($1, $2, $3, $4) $f$;
         CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_e_owner.probe('unnest'); SELECT pg_catalog.unnest($1) $f$;
         CREATE FUNCTION public.md5(varchar) RETURNS text LANGUAGE sql VOLATILE AS
             $f$ SELECT sec_e_owner.probe('md5'); SELECT pg_catalog.md5($1::text) $f$;
         CREATE FUNCTION public.to_jsonb(record) RETURNS jsonb LANGUAGE plpgsql VOLATILE AS
             $f$ BEGIN PERFORM sec_e_owner.probe('to_jsonb'); RETURN pg_catalog.to_jsonb($1); END $f$;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC;",
    )
    .unwrap();
    // a superuser session with the default search path ("$user", public)
    let mut su = connect(&db);
    su.batch_execute(TEMPLATE).unwrap();
    su.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\", \"key\": \"k\"}, \"template\": \"t\",
             \"context\": {\"c\": \"SELECT 1 AS one\"}}');
         SELECT nudge.set_profile_query('SELECT p.email FROM nudge.profiles p WHERE p.user_id = $1');
         INSERT INTO nudge.profiles (user_id, email, timezone) VALUES ('u1', 'u1@example.com', 'UTC');
         SELECT nudge.track('u1', 'e', '{\"k\": \"a\"}', now() - interval '1 minute');
         INSERT INTO nudge.events (user_id, event, props, occurred_at) VALUES ('u1', 'e', '{\"k\": \"b\"}', now());
         SELECT nudge.run_due();
         SELECT nudge.preview('x', 'u1');
         SELECT * FROM nudge.explain('x', 'u1');
         SELECT * FROM nudge.trigger_stats;",
    )
    .unwrap();
    assert!(
        !is_superuser(&mut su, "sec_e_owner"),
        "the database owner made itself superuser"
    );
    assert_eq!(seen(&mut su, "sec_e_owner"), Vec::<String>::new());
    assert_eq!(count(&mut su, "SELECT count(*) FROM nudge.outbox"), 2);
}

#[test]
fn mailer_and_plain_roles_cannot_call_generated_functions_or_read_the_catalog() {
    let db = with_roles("sec_f");
    let mut a = connect_as(&db, "sec_f_admin");
    a.batch_execute(
        "CREATE TABLE sec_f_admin.cards (customer text, number text);
         INSERT INTO sec_f_admin.cards VALUES ('u1', '4111-1111-1111-1111');",
    )
    .unwrap();
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.define_trigger('x', '{\"on\": {\"event\": \"e\"}, \"template\": \"t\",
            \"context\": {\"card\": \"SELECT number FROM sec_f_admin.cards WHERE customer = $1\"}}');
         SELECT nudge.set_profile_query('SELECT customer AS email FROM sec_f_admin.cards WHERE customer = $1')",
    )
    .unwrap();
    let mut su = connect(&db);
    let functions: Vec<String> = su
        .query("SELECT function FROM nudge.user_sql", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(functions.len(), 2);
    for role in [
        "sec_f_mailer",
        "sec_f_plain",
        "sec_f_writer",
        "sec_f_admin2",
    ] {
        let mut c = connect_as(&db, role);
        for f in &functions {
            let sql = format!("SELECT {f}('u1')");
            assert_eq!(sqlstate(c.batch_execute(&sql)), "42501", "as {role}: {sql}");
        }
    }
    let mut p = connect_as(&db, "sec_f_plain");
    for sql in [
        "SELECT * FROM nudge.user_sql",
        "SELECT * FROM nudge.outbox",
        "SELECT nudge.run_due()",
        "SELECT nudge.track('u1', 'e')",
    ] {
        assert_eq!(
            sqlstate(p.batch_execute(sql)),
            "42501",
            "as a plain role: {sql}"
        );
    }
    // each generated function has no grant but its owner's
    let acl = count(
        &mut su,
        "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          WHERE p.proname LIKE '\\_user\\_sql\\_%' AND a.grantee <> p.proowner",
    );
    assert_eq!(
        acl, 0,
        "a generated function is executable by someone else than its definer"
    );
}

#[test]
fn sources_need_rights_on_the_table_and_no_user_written_casts() {
    let db = with_roles("sec_g");
    let mut a2 = connect_as(&db, "sec_g_admin2");
    a2.batch_execute("CREATE TABLE sec_g_admin2.theirs (customer text)")
        .unwrap();
    let mut a = connect_as(&db, "sec_g_admin");
    // not a temporary table, which only its session can read
    assert_eq!(
        sqlstate(a.batch_execute(
            "CREATE TEMP TABLE mine (customer text); SELECT nudge.add_source('mine', 'customer', event_name => 'x')"
        )),
        "42809"
    );
    // not its table
    assert_eq!(
        sqlstate(a.batch_execute(
            "SELECT nudge.add_source('sec_g_admin2.theirs', 'customer', event_name => 'x')"
        )),
        "42501"
    );
    // a column whose type has a cast the admin wrote: reading the table in
    // privileged code would run it
    a.batch_execute(
        "CREATE TYPE sec_g_admin.mood AS ENUM ('ok', 'bad');
         CREATE FUNCTION sec_g_admin.mood_json(sec_g_admin.mood) RETURNS jsonb LANGUAGE sql AS $f$ SELECT '1'::jsonb $f$;
         CREATE CAST (sec_g_admin.mood AS jsonb) WITH FUNCTION sec_g_admin.mood_json(sec_g_admin.mood);
         CREATE TABLE sec_g_admin.moods (customer text, mood sec_g_admin.mood);
         CREATE TABLE sec_g_admin.orders (customer text, note text);",
    )
    .unwrap();
    assert_eq!(
        sqlstate(a.batch_execute(
            "SELECT nudge.add_source('sec_g_admin.moods', 'customer', event_name => 'felt')"
        )),
        "42501"
    );
    // a clean table is fine; giving it such a column later is refused
    a.batch_execute(
        "SELECT nudge.add_source('sec_g_admin.orders', 'customer', event_name => 'purchased')",
    )
    .unwrap();
    assert_eq!(
        sqlstate(
            a.batch_execute("ALTER TABLE sec_g_admin.orders ADD COLUMN mood sec_g_admin.mood")
        ),
        "42501"
    );
    a.batch_execute(
        "CREATE TYPE sec_g_admin.size AS ENUM ('s', 'm');
         ALTER TABLE sec_g_admin.orders ADD COLUMN size sec_g_admin.size;
         CREATE FUNCTION sec_g_admin.size_text(sec_g_admin.size) RETURNS text LANGUAGE sql AS $f$ SELECT 'x' $f$;",
    )
    .unwrap();
    assert_eq!(
        sqlstate(a.batch_execute(
            "CREATE CAST (sec_g_admin.size AS text) WITH FUNCTION sec_g_admin.size_text(sec_g_admin.size)"
        )),
        "42501"
    );
    // and the source works
    a.batch_execute("INSERT INTO sec_g_admin.orders VALUES ('u1', 'n', 's')")
        .unwrap();
    let mut su = connect(&db);
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM nudge.all_events WHERE user_id = 'u1' AND props->>'size' = 's'"
        ),
        1
    );
}

#[test]
fn templates_escape_html_and_a_runaway_template_fails_alone() {
    let db = with_roles("sec_h");
    let mut a = connect_as(&db, "sec_h_admin");
    a.batch_execute(
        r#"SELECT nudge.define_template('note', 'Hi {{ event.name }}',
               '<p>{{ event.name }}</p>{{ event.trusted | raw }}', 'Hi {{ event.name }}');
           SELECT nudge.define_template('huge', 'Big',
               '{% for i in (1..10000) %}{% for j in event.items %}{{ event.pad }}{% endfor %}{% endfor %}');
           SELECT nudge.define_trigger('note', '{"on": {"event": "note"}, "template": "note"}');
           SELECT nudge.define_trigger('huge', '{"on": {"event": "huge"}, "template": "huge"}');"#,
    )
    .unwrap();
    // a range no budget could walk is refused when defined, with the line
    let err = a
        .batch_execute(
            "SELECT nudge.define_template('endless', 'x', '<p>\n{% for i in (1..1000000000000) %}x{% endfor %}')",
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("html: line 2"), "{message}");
    let mut su = connect(&db);
    su.batch_execute(
        r#"INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
           SELECT nudge.track('u1', 'note', '{"name": "<img src=x onerror=alert(1)>", "trusted": "<b>ok</b>"}',
                              now() - interval '1 minute');
           SELECT nudge.track('u2', 'huge', jsonb_build_object('pad', repeat('x', 1024),
                              'items', (SELECT jsonb_agg(g) FROM generate_series(1, 100) g)), now() - interval '1 minute');
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    let r = su
        .query_one(
            "SELECT subject, html, text_body FROM nudge.outbox WHERE user_id = 'u1'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "Hi <img src=x onerror=alert(1)>");
    assert_eq!(
        r.get::<_, String>(1),
        "<p>&lt;img src=x onerror=alert(1)&gt;</p><b>ok</b>"
    );
    assert_eq!(r.get::<_, String>(2), "Hi <img src=x onerror=alert(1)>");
    let huge: String = su
        .query_one(
            "SELECT state || ': ' || reason FROM nudge.enrollments WHERE user_id = 'u2'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        huge.starts_with("failed") && huge.contains("output over"),
        "{huge}"
    );
}

#[test]
fn source_mappings_cannot_inject_sql_whatever_the_quoting_settings() {
    let db = with_roles("sec_i");
    let mut a = connect_as(&db, "sec_i_admin");
    // with standard_conforming_strings off, a backslash before a quote made a
    // doubled quote end the literal in the SQL that add_source runs as the
    // extension's owner
    a.batch_execute(
        r#"SET standard_conforming_strings = off;
           CREATE TABLE sec_i_admin.t (u text, "p\')--" text);
           SELECT nudge.add_source('sec_i_admin.t', 'u', props_column => $q$p\')--$q$,
               event_name => $q$x\' AS event, now() AS occurred_at, NULL::jsonb AS props FROM (SELECT NULL::text AS u) r WHERE false; ALTER ROLE sec_i_admin SUPERUSER;--$q$);"#,
    )
    .unwrap();
    let mut su = connect(&db);
    assert!(
        !is_superuser(&mut su, "sec_i_admin"),
        "the admin made itself superuser"
    );
    // the odd names are names, and the source works
    a.batch_execute(r#"INSERT INTO sec_i_admin.t VALUES ('u1', '{"a": 1}')"#)
        .unwrap();
    let event: String = su
        .query_one(
            "SELECT event FROM nudge.all_events WHERE user_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(event.starts_with("x\\' AS event"), "{event}");
    assert!(
        !is_superuser(&mut su, "sec_i_admin"),
        "the admin made itself superuser"
    );
}

#[test]
fn a_reinstall_keeps_no_grant_or_object_left_in_our_schema() {
    let db = with_roles("sec_j");
    let mut su = connect(&db);
    // what a 0.2.0 install left: CREATE for nudge_admin on the schema, which
    // DROP EXTENSION keeps
    su.batch_execute(
        "GRANT CREATE ON SCHEMA nudge TO nudge_admin, PUBLIC;
         DROP EXTENSION pg_nudge;
         CREATE EXTENSION pg_nudge;",
    )
    .unwrap();
    let r = su
        .query_one(
            "SELECT has_schema_privilege('nudge_admin', 'nudge', 'CREATE'),
                    has_schema_privilege('sec_j_plain', 'nudge', 'CREATE')",
            &[],
        )
        .unwrap();
    let (admin, public): (bool, bool) = (r.get(0), r.get(1));
    assert!(
        !admin && !public,
        "a CREATE grant on schema nudge survived the reinstall"
    );
    // an object planted there before is found, and the install refused
    su.batch_execute(
        "DROP EXTENSION pg_nudge;
         CREATE FUNCTION nudge.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT pg_catalog.now()';",
    )
    .unwrap();
    assert_eq!(
        sqlstate(su.batch_execute("CREATE EXTENSION pg_nudge")),
        "42501"
    );
}

#[test]
fn the_owner_of_a_source_runs_nothing_as_anyone_but_itself() {
    let db = with_roles("sec_k");
    // an application role (none of ours) owns a table that an admin may
    // register; planning a read of it evaluates the immutable function of an
    // index expression, which would run as whoever plans the read
    let mut o = connect_as(&db, "sec_k_owner");
    o.batch_execute("CREATE SCHEMA sec_k_owner").unwrap();
    plant_probe(&mut o, "sec_k_owner", "sec_k_owner");
    o.batch_execute(
        "CREATE TABLE sec_k_owner.orders (customer text, cart text, at timestamptz);
         CREATE FUNCTION sec_k_owner.imm() RETURNS text LANGUAGE plpgsql IMMUTABLE AS
             $f$ BEGIN PERFORM sec_k_owner.probe('planned'); RETURN ''; END $f$;
         CREATE INDEX ON sec_k_owner.orders ((customer || sec_k_owner.imm()));
         GRANT TRIGGER, SELECT ON sec_k_owner.orders TO sec_k_admin;",
    )
    .unwrap();
    let mut a = connect_as(&db, "sec_k_admin");
    a.batch_execute(TEMPLATE).unwrap();
    a.batch_execute(
        "SELECT nudge.add_source('sec_k_owner.orders', 'customer', time_column => 'at', event_name => 'purchased');
         SELECT nudge.define_trigger('cart', '{\"on\": {\"event\": \"cart_added\", \"key\": \"cart\"}, \"wait\": \"1 hour\",
             \"unless\": [{\"event\": \"purchased\", \"same_key\": true}], \"template\": \"t\",
             \"goal\": {\"event\": \"purchased\", \"within\": \"7 days\"}}');",
    )
    .unwrap();
    o.batch_execute("TRUNCATE sec_k_owner.seen").unwrap();
    let mut su = connect(&db);
    su.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
         SELECT nudge.track('u1', 'cart_added', '{\"cart\": \"k1\"}', now() - interval '3 hours');
         SELECT nudge.track('u2', 'cart_added', '{\"cart\": \"k2\"}', now() - interval '3 hours');",
    )
    .unwrap();
    o.batch_execute(
        "INSERT INTO sec_k_owner.orders VALUES ('u2', 'k2', now() - interval '2 hours 30 minutes')",
    )
    .unwrap();
    // a superuser's backtest, first to plan a read of the table in its
    // backend (a backend evaluates an index expression's constants once)
    connect(&db)
        .batch_execute(
            "SELECT * FROM nudge.backtest('{\"on\": {\"event\": \"purchased\"}, \"template\": \"t\"}',
                                         now() - interval '1 day', now())",
        )
        .unwrap();
    // the exit re-check at send time, capture's reads and trigger_stats
    // (which the worker reads for experiments) all read the table
    su.batch_execute(
        "SELECT nudge.run_due();
         SELECT * FROM nudge.trigger_stats;
         SELECT count(*) FROM nudge.all_events;",
    )
    .unwrap();
    assert!(
        !is_superuser(&mut su, "sec_k_owner"),
        "the table's owner made itself superuser"
    );
    let runs = seen(&mut su, "sec_k_owner");
    assert!(
        runs.iter().all(|s| s.starts_with("sec_k_owner:")),
        "the table owner's code ran as someone else: {runs:?}"
    );
    assert!(!runs.is_empty(), "the reads were never planned");
    let states: Vec<String> = su
        .query(
            "SELECT user_id || ':' || state FROM nudge.enrollments ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, vec!["u1:sent", "u2:exited"]);
}

#[test]
fn an_admin_sees_another_definers_query_results_neither_in_messages_nor_in_previews() {
    let db = with_roles("sec_l");
    let mut b = connect_as(&db, "sec_l_admin2");
    b.batch_execute(
        "CREATE TABLE sec_l_admin2.cards (customer text, number text);
         INSERT INTO sec_l_admin2.cards VALUES ('u1', '4111-1111-1111-1111');
         SELECT nudge.define_template('card', 'Card', '<p>{{ context.c.number }}</p>');
         SELECT nudge.define_trigger('b', '{\"on\": {\"event\": \"e\"}, \"template\": \"card\",
             \"context\": {\"c\": \"SELECT number FROM sec_l_admin2.cards WHERE customer = $1\"}}');",
    )
    .unwrap();
    let mut su = connect(&db);
    su.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
         SELECT nudge.track('u1', 'e', '{}', now() - interval '1 minute');
         SELECT nudge.run_due();",
    )
    .unwrap();
    let mut a = connect_as(&db, "sec_l_admin");
    assert_eq!(count(&mut a, "SELECT count(*) FROM nudge.outbox"), 0);
    assert_eq!(
        sqlstate(a.batch_execute("SELECT nudge.preview('b', 'u1')")),
        "42501"
    );
    // nor through the mailer's functions, which run as the owner
    assert_eq!(
        sqlstate(a.batch_execute("SELECT * FROM nudge.claim(100, '0 seconds')")),
        "42501"
    );
    // nor through a journey's reason (a failed render quotes values)
    assert_eq!(
        count(
            &mut a,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'b'"
        ),
        0
    );
    // nor by forging engine state, or taking over the profile query
    assert_eq!(
        sqlstate(a.batch_execute("UPDATE nudge.enrollments SET state = 'waiting'")),
        "42501"
    );
    b.batch_execute("SELECT nudge.set_profile_query('SELECT p.email FROM nudge.profiles p WHERE p.user_id = $1')")
        .unwrap();
    assert_eq!(
        sqlstate(a.batch_execute(
            "SELECT nudge.set_profile_query('SELECT ''me@evil.example'' AS email')"
        )),
        "42501"
    );
    // its definer, and the mailer, see the message
    assert_eq!(
        count(
            &mut b,
            "SELECT count(*) FROM nudge.outbox WHERE html LIKE '%4111%'"
        ),
        1
    );
    b.batch_execute("SELECT nudge.preview('b', 'u1')").unwrap();
    let mut m = connect_as(&db, "sec_l_mailer");
    assert_eq!(count(&mut m, "SELECT count(*) FROM nudge.outbox"), 1);
}

/// The key that signs unsubscribe links is the extension's alone: with it,
/// anyone could unsubscribe anyone. An admin cannot read it, a writer cannot
/// use the token function, and a mailer (the gateway's role) can unsubscribe
/// only with a token that pg_nudge made; the roles that record preferences
/// change consent, nobody else.
#[test]
fn only_a_token_pg_nudge_made_unsubscribes_and_nobody_reads_the_key() {
    let db = with_roles("consent");
    let mut c = connect(&db);
    c.batch_execute(
        r#"SELECT nudge.configure('{"unsubscribe_url": "https://g.example"}');
           SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
           SELECT nudge.define_trigger('news', '{"on": {"event": "read"}, "topic": "newsletter", "template": "t"}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com');
           SELECT nudge.track(u, 'read', '{}', now() - interval '1 minute') FROM unnest(ARRAY['u1', 'u2']) u;
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    let token: String = c
        .query_one(
            "SELECT substring(headers->>'List-Unsubscribe' FROM '/u/([^>]+)>') FROM nudge.outbox WHERE user_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    let mut admin = connect_as(&db, "consent_admin");
    assert_eq!(
        sqlstate(admin.query("SELECT value FROM nudge.secrets", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(admin.query("SELECT * FROM nudge.secrets", &[])),
        "42501",
        "an admin read the unsubscribe key"
    );
    let mut writer = connect_as(&db, "consent_writer");
    assert_eq!(
        sqlstate(writer.query("SELECT * FROM nudge.unsubscribe($1)", &[&token])),
        "42501"
    );
    assert_eq!(
        sqlstate(writer.query("SELECT value FROM nudge.secrets", &[])),
        "42501"
    );
    // a writer records its users' choices
    assert_eq!(
        sqlstate(writer.execute(
            "SELECT nudge.unsubscribe('u2', 'newsletter', 'preferences')",
            &[]
        )),
        "ok"
    );
    let mut plain = connect_as(&db, "consent_plain");
    assert_eq!(
        sqlstate(plain.execute("SELECT nudge.unsubscribe('u1', 'all')", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(plain.query("SELECT * FROM nudge.unsubscribe($1)", &[&token])),
        "42501"
    );
    // the mailer: a made-up token for u2's address, and u1's token altered to
    // another topic, are refused with 22023; u1's own token works
    let mut mailer = connect_as(&db, "consent_mailer");
    let (payload, mac) = token.split_once('.').unwrap();
    let forged = [
        "bm1fMR91MR9uZXdzbGV0dGVy.AAAA".to_string(),
        format!("{payload}x.{mac}"),
        format!("{payload}.{}", mac.chars().rev().collect::<String>()),
    ];
    for f in &forged {
        assert_eq!(
            sqlstate(mailer.query("SELECT * FROM nudge.unsubscribe($1)", &[f])),
            "22023",
            "{f}"
        );
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.subscriptions WHERE user_id = 'u1'"
        ),
        0,
        "a forged token changed consent"
    );
    let row = mailer
        .query_one(
            "SELECT user_id, topic, changed FROM nudge.unsubscribe($1)",
            &[&token],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, bool>(2)
        ),
        ("u1".to_string(), "newsletter".to_string(), true)
    );
    // and the mailer cannot set consent any other way
    assert_eq!(
        sqlstate(mailer.execute("SELECT nudge.subscribe('u1', 'newsletter')", &[])),
        "42501"
    );
}

/// Flows (0.9.0): watching a table's changes needs the rights on it that
/// add_source needs; the profile trigger that checks segments runs for a
/// writer with no right on our tables, and neither it nor the change
/// trigger's functions can be called by the roles we create.
#[test]
fn watching_changes_needs_rights_and_segment_checks_run_for_any_writer() {
    let db = with_roles("sec_p");
    let mut a2 = connect_as(&db, "sec_p_admin2");
    a2.batch_execute(
        "CREATE TABLE sec_p_admin2.accounts (customer text, plan text);
         SELECT nudge.add_source('sec_p_admin2.accounts', 'customer', event_name => 'opened');",
    )
    .unwrap();
    let mut a = connect_as(&db, "sec_p_admin");
    // not its table: refused, and nothing is watched
    assert_eq!(
        sqlstate(
            a.batch_execute("SELECT nudge.watch_changes('sec_p_admin2.accounts', ARRAY['plan'])")
        ),
        "42501"
    );
    let mut su = connect(&db);
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM nudge.sources WHERE changes IS NOT NULL"
        ),
        0
    );
    // its owner may; an update by a role with UPDATE on the table only
    // (no right on pg_nudge's tables) emits the change
    a2.batch_execute(
        "SELECT nudge.watch_changes('sec_p_admin2.accounts', ARRAY['plan']);
         INSERT INTO sec_p_admin2.accounts VALUES ('u1', 'free');
         GRANT USAGE ON SCHEMA sec_p_admin2 TO sec_p_plain;
         GRANT SELECT, UPDATE ON sec_p_admin2.accounts TO sec_p_plain;
         SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
         SELECT nudge.define_trigger('upgraded', '{\"on\": {\"changed\": \"plan\"}, \"template\": \"t\"}');
         SELECT nudge.define_trigger('vip', '{\"on\": {\"segment_entered\": {\"vip\": {\"eq\": true}}}, \"template\": \"t\"}');",
    )
    .unwrap();
    let mut plain = connect_as(&db, "sec_p_plain");
    plain
        .batch_execute("UPDATE sec_p_admin2.accounts SET plan = 'pro'")
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'upgraded'"
        ),
        1
    );
    // a writer's identify moves a user into the segment: the journey starts
    let mut w = connect_as(&db, "sec_p_writer");
    w.batch_execute(
        "SELECT nudge.identify(ARRAY['u2'], ARRAY['u2@example.com'], ARRAY[NULL], ARRAY['{\"vip\": true}'::jsonb], ARRAY[NULL::jsonb])",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM nudge.enrollments WHERE trigger = 'vip' AND user_id = 'u2'"
        ),
        1
    );
    // the functions behind them are ours alone to call
    for (role, sql) in [
        ("sec_p_writer", "SELECT nudge._profiles_changed(ARRAY['u3'])"),
        ("sec_p_admin", "SELECT nudge._profiles_changed(ARRAY['u3'])"),
        ("sec_p_admin", "SELECT nudge._watch_changes('sec_p_admin2.accounts'::regclass::oid, ARRAY['customer'])"),
        ("sec_p_plain", "SELECT nudge.watch_changes('sec_p_admin2.accounts', ARRAY['customer'])"),
    ] {
        let mut c = connect_as(&db, role);
        assert_eq!(sqlstate(c.batch_execute(sql)), "42501", "{role}: {sql}");
    }
}

/// Citus (0.10.0): the functions behind a cluster's claim and set-up are no
/// role of ours to call: `_claim_here` hands messages out as the extension's
/// owner (a mailer claims through `claim`), the others distribute tables or
/// run commands on the nodes.
#[test]
fn cluster_functions_are_no_role_of_ours_to_call() {
    let db = with_roles("sec_cl");
    for role in ["sec_cl_admin", "sec_cl_mailer", "sec_cl_writer"] {
        let mut c = connect_as(&db, role);
        for sql in [
            "SELECT * FROM nudge._claim_here(10, '1 minute', 'x')",
            "SELECT * FROM nudge.distribute()",
            "SELECT nudge._prepare_node()",
            "SELECT * FROM nudge._on_nodes(ARRAY['SELECT 1'])",
            "SELECT nudge._source_here('nudge.events', NULL, NULL, NULL, NULL, NULL)",
            "SELECT nudge._sources_to_nodes()",
        ] {
            assert_eq!(sqlstate(c.batch_execute(sql)), "42501", "as {role}: {sql}");
        }
    }
    // the mailer claims through claim, as before
    let mut m = connect_as(&db, "sec_cl_mailer");
    m.batch_execute("SELECT * FROM nudge.claim(1)").unwrap();
}
