-- SQL-facing pieces that are plain SQL: wrappers for regclass arguments,
-- catalog reads, and the registration of nudge.events as the first source.

-- Event names any trigger reads; the capture trigger drops every other event
-- before it crosses into Rust, so unwatched events cost almost nothing.
-- The events of every source, as (user_id, event, occurred_at, props). Not a
-- view over the sources themselves: an object of ours that depended on a
-- user's table would be dropped with it (DROP ... CASCADE of a source, its
-- schema or a mapped column dropped the extension with all its data).
-- nudge._all_events (src/all_events.rs) reads the sources registered now,
-- each as its owner.
CREATE VIEW nudge.all_events AS SELECT * FROM nudge._all_events(NULL);

CREATE FUNCTION nudge._watched_events() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT w), '{}') FROM nudge.triggers, unnest(watches) AS w
$$;

CREATE FUNCTION nudge.add_source(
    source regclass,
    user_column text,
    event_column text DEFAULT NULL,
    time_column text DEFAULT NULL,
    props_column text DEFAULT NULL,
    event_name text DEFAULT NULL
) RETURNS void LANGUAGE sql SET search_path = pg_catalog, nudge, pg_temp AS $$
    SELECT nudge._add_source(source::oid, user_column, event_column, time_column, props_column, event_name)
$$;

CREATE FUNCTION nudge.drop_source(source regclass) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, nudge, pg_temp AS $$ SELECT nudge._drop_source(source::oid) $$;

-- Changes as events (docs/reference.md, "Changes as events"): an UPDATE that
-- changes one of these columns of a registered source emits <column>_changed.
CREATE FUNCTION nudge.watch_changes(source regclass, columns text[]) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, nudge, pg_temp AS $$ SELECT nudge._watch_changes(source::oid, columns) $$;

-- A step's name, as the trigger's version that made the enrollment calls
-- it: its "name", else its number ("1", "2", ...; a definition without steps
-- is step "1"). A step inserted in a later version does not rename the
-- journeys of an earlier one.
CREATE FUNCTION nudge._step_name(trigger text, version int, step int) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    SELECT coalesce((SELECT v.definition->'steps'->_step_name.step->>'name'
                       FROM nudge.trigger_versions v
                      WHERE v.trigger = _step_name.trigger AND v.version = _step_name.version),
                    (_step_name.step + 1)::text)
$$;

-- A journey's entry and run_due's decision are its enrollment row (entered_at,
-- state, rule, reason); the steps in between are journal lines. A journey of
-- several steps has a row per step: each step's lines say which.
CREATE FUNCTION nudge.explain(trigger text, user_id text)
RETURNS TABLE (at timestamptz, step text, detail text, rule text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
DECLARE
    flow boolean;
BEGIN
    -- a misspelled name is an error, not an empty answer
    IF NOT EXISTS (SELECT 1 FROM nudge.trigger_versions v WHERE v.trigger = explain.trigger) THEN
        RAISE EXCEPTION 'explain: no trigger named "%"', explain.trigger
              USING ERRCODE = 'undefined_object',
                    HINT = 'nudge.triggers lists the triggers; a dropped one is still explained.';
    END IF;
    flow := EXISTS (SELECT 1 FROM nudge.trigger_versions v WHERE v.trigger = explain.trigger AND v.definition ? 'steps');
    RETURN QUERY
    SELECT s.at, s.step, s.detail, s.rule FROM (
        SELECT e.entered_at AS at, 0 AS o, e.id, 'entered' AS step,
               'v' || e.trigger_version || CASE WHEN e.key <> '' THEN ' key ' || e.key ELSE '' END
               || CASE WHEN flow THEN ', step ' || nudge._step_name(e.trigger, e.trigger_version, 0) ELSE '' END
               || ', due ' || to_char(e.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
               || coalesce(', arm ' || e.variant, '') AS detail,
               NULL::text AS rule
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id AND e.step = 0
        UNION ALL
        -- a later step: it waits from the decision of the step before it
        SELECT e.created_at, 3, e.id, 'next step',
               'step ' || nudge._step_name(e.trigger, e.trigger_version, e.step)
               || CASE WHEN e.key <> '' THEN ' (key ' || e.key || ')' ELSE '' END
               || ', due ' || to_char(e.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC',
               NULL::text
          FROM (SELECT x.*, coalesce((SELECT p.due_at FROM nudge.enrollments p
                                       WHERE p.user_id = x.user_id AND p.trigger = x.trigger AND p.key = x.key
                                         AND p.entered_at = x.entered_at AND p.step < x.step
                                       ORDER BY p.step DESC LIMIT 1), x.entered_at) AS created_at
                  FROM nudge.enrollments x
                 WHERE x.trigger = explain.trigger AND x.user_id = explain.user_id AND x.step > 0) e
        UNION ALL
        SELECT j.at, 1, j.id, j.step, j.detail, j.rule
          FROM nudge.journal j
         WHERE j.trigger = explain.trigger AND j.user_id = explain.user_id
        UNION ALL
        -- what run_due (or claim) decided: the enrollment's state, rule and
        -- reason; an exit at capture is the journal's line above
        SELECT CASE WHEN e.state = 'exited' THEN e.exited_at ELSE e.due_at END, 2, e.id, e.state,
               CASE WHEN flow THEN 'step ' || nudge._step_name(e.trigger, e.trigger_version, e.step)
                                   || CASE WHEN e.key <> '' THEN ' (key ' || e.key || ')' ELSE '' END || ': '
                    ELSE '' END || e.reason,
               e.rule
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id
           AND (e.state IN ('sent', 'held_out', 'suppressed', 'failed', 'expired', 'cancelled', 'skipped')
                OR e.state = 'exited'
                   AND NOT EXISTS (SELECT 1 FROM nudge.journal j
                                    WHERE j.user_id = e.user_id AND j.enrollment_id = e.id AND j.step = 'exited'))) s
     ORDER BY s.at, s.o, s.id;
END
$$;

-- Per trigger, step and arm (each variant, 'default' without variants, and
-- 'holdout'): what happened to the journeys that entered in [from_ts, to_ts),
-- what the messages did, and the conversions attributed to them. A journey
-- of several steps has a row per step ('1' for a definition without steps):
-- entered is how many journeys reached the step, skipped how many a branch
-- sent past it. A goal event counts once, for the user's latest exposure
-- (send or held-out moment, of any step) of that trigger before it, when it
-- falls within the goal's window. Each variant is compared with the holdout
-- of the same step: uplift in conversion rate, its 95% interval and the
-- two-sided p-value of the two-proportion z-test.
CREATE FUNCTION nudge.trigger_stats(from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (
    trigger text, arm text,
    entered bigint, exited bigint, suppressed bigint, suppressed_by jsonb, failed bigint,
    held_out bigint, sent bigint, delivered bigint, opened bigint, clicked bigint,
    converted bigint, conversion_rate float8, revenue numeric,
    uplift float8, uplift_ci_low float8, uplift_ci_high float8, p_value float8,
    step text, skipped bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
-- plpgsql, not sql: Citus plans a SQL function's parameters not at all, and
-- this query with their values well (docs/citus.md)
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH e AS (
        -- a step by the name its version gave it
        SELECT en.id, en.trigger, en.user_id, en.state, en.rule, en.message_key, en.sent_at,
               coalesce(en.variant, 'default') AS arm, en.step AS place,
               coalesce(v.definition->'steps'->en.step->>'name', (en.step + 1)::text) AS step
          FROM nudge.enrollments en
          LEFT JOIN nudge.trigger_versions v ON v.trigger = en.trigger AND v.version = en.trigger_version
         WHERE en.entered_at >= from_ts AND en.entered_at < to_ts),
    goal AS (
        SELECT DISTINCT ON (v.trigger) v.trigger, v.definition->'goal'->>'event' AS event,
               nudge._duration(v.definition->'goal'->>'within') AS within,
               v.definition->'goal'->>'value' AS value_field
          FROM nudge.trigger_versions v
         WHERE v.definition ? 'goal'
         ORDER BY v.trigger, v.version DESC),
    attributed AS (
        SELECT x.id, sum(coalesce(
                   CASE WHEN jsonb_typeof(ev.props->g.value_field) = 'number'
                        THEN (ev.props->>g.value_field)::numeric END, 0)) AS revenue
          FROM goal g
          JOIN nudge._all_events(ARRAY(SELECT g2.event FROM goal g2)) ev ON ev.event = g.event
         CROSS JOIN LATERAL (
               SELECT x.id, x.sent_at FROM e x
                WHERE x.trigger = g.trigger AND x.user_id = ev.user_id
                  AND x.state IN ('sent', 'held_out') AND x.sent_at <= ev.occurred_at
                ORDER BY x.sent_at DESC
                LIMIT 1) x
         WHERE ev.occurred_at <= x.sent_at + g.within
         GROUP BY x.id),
    arms AS (
        SELECT e.trigger, e.arm, e.step, min(e.place) AS place,
               count(*) AS entered,
               count(*) FILTER (WHERE e.state = 'exited') AS exited,
               count(*) FILTER (WHERE e.state = 'suppressed') AS suppressed,
               count(*) FILTER (WHERE e.state = 'failed') AS failed,
               count(*) FILTER (WHERE e.state = 'held_out') AS held_out,
               count(*) FILTER (WHERE e.state = 'sent') AS sent,
               count(*) FILTER (WHERE e.state = 'skipped') AS skipped,
               count(o.delivered_at) AS delivered,
               count(o.opened_at) AS opened,
               count(o.clicked_at) AS clicked,
               count(a.id) AS converted,
               coalesce(sum(a.revenue), 0) AS revenue
          FROM e
          LEFT JOIN nudge.outbox o ON o.message_key = e.message_key AND o.user_id = e.user_id
          LEFT JOIN attributed a ON a.id = e.id
         GROUP BY e.trigger, e.arm, e.step),
    reasons AS (
        SELECT r.trigger, r.arm, r.step, jsonb_object_agg(r.rule, r.n) AS suppressed_by
          FROM (SELECT e.trigger, e.arm, e.step,
                       coalesce(e.rule, 'unknown') AS rule,
                       count(*) AS n
                  FROM e WHERE e.state = 'suppressed' GROUP BY 1, 2, 3, 4) r
         GROUP BY r.trigger, r.arm, r.step)
    SELECT a.trigger, a.arm, a.entered, a.exited, a.suppressed, coalesce(r.suppressed_by, '{}'), a.failed,
           a.held_out, a.sent, a.delivered, a.opened, a.clicked,
           a.converted, a.converted::float8 / nullif(a.sent + a.held_out, 0), a.revenue,
           u.uplift, u.ci_low, u.ci_high, u.p_value,
           a.step, a.skipped
      FROM arms a
      LEFT JOIN reasons r ON r.trigger = a.trigger AND r.arm = a.arm AND r.step = a.step
      LEFT JOIN arms h ON h.trigger = a.trigger AND h.step = a.step AND h.arm = 'holdout' AND a.arm <> 'holdout'
      LEFT JOIN LATERAL nudge._uplift(a.converted, a.sent, h.converted, h.held_out) u ON h.trigger IS NOT NULL
     ORDER BY a.trigger, a.place, a.step, a.arm;
END
$$;

CREATE VIEW nudge.trigger_stats AS SELECT * FROM nudge.trigger_stats();

-- An A/B test's question: does variant B convert better than variant A?
-- Every pair of a trigger's variants (not the holdout, which trigger_stats
-- compares each variant with), at each step, as trigger_stats counts them:
-- B's conversion rate minus A's, its 95% interval and the two-sided p-value.
CREATE FUNCTION nudge.compare_arms(from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (trigger text, arm text, against text, sent bigint, converted bigint,
               against_sent bigint, against_converted bigint,
               uplift float8, uplift_ci_low float8, uplift_ci_high float8, p_value float8,
               step text)
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    WITH s AS (SELECT * FROM nudge.trigger_stats(from_ts, to_ts) WHERE arm NOT IN ('holdout', 'default'))
    SELECT b.trigger, b.arm, a.arm, b.sent, b.converted, a.sent, a.converted,
           u.uplift, u.ci_low, u.ci_high, u.p_value, b.step
      FROM s a JOIN s b ON b.trigger = a.trigger AND b.step = a.step AND b.arm > a.arm
      CROSS JOIN LATERAL nudge._uplift(b.converted, b.sent, a.converted, a.sent) u
     ORDER BY b.trigger, b.step, a.arm, b.arm
$$;

-- Consent by topic (docs/reference.md, "Consent"): the latest choice of a
-- user per topic; 'all' covers every topic. Checked when a message is decided
-- and again right before a mailer gets it.
CREATE FUNCTION nudge.subscribe(user_id text, topic text DEFAULT 'marketing', source text DEFAULT 'api')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT nudge._set_subscription(subscribe.user_id, subscribe.topic, 'subscribed', subscribe.source)
$$;
CREATE FUNCTION nudge.unsubscribe(user_id text, topic text, source text DEFAULT 'api')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT nudge._set_subscription(unsubscribe.user_id, unsubscribe.topic, 'unsubscribed', unsubscribe.source)
$$;
CREATE FUNCTION nudge._set_subscription(user_id text, topic text, status text, source text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changed boolean;
BEGIN
    IF coalesce(btrim(user_id), '') = '' OR coalesce(btrim(topic), '') = '' THEN
        RAISE EXCEPTION 'subscriptions: user_id and topic must not be empty'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO nudge.subscriptions AS s (user_id, topic, status, updated_at, source)
    VALUES (_set_subscription.user_id, _set_subscription.topic, _set_subscription.status, now(),
            coalesce(_set_subscription.source, 'api'))
    ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE
       SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, source = EXCLUDED.source
     WHERE s.status <> EXCLUDED.status
    RETURNING true INTO changed;
    RETURN coalesce(changed, false);
END
$$;

-- A write of a profile may move its user into (or out of) a segment trigger's
-- segment. The function runs as the extension, so that any writer of
-- profiles (nudge_writer through identify, the gateway) needs no right on
-- our tables; a failure in it is a warning, never the writer's error.
CREATE FUNCTION nudge._on_profiles() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, nudge, pg_temp AS $$
BEGIN
    PERFORM nudge._profiles_changed(ARRAY(SELECT c.user_id FROM changed c));
    RETURN NULL;
END
$$;
CREATE TRIGGER profiles_inserted_segments AFTER INSERT ON nudge.profiles
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION nudge._on_profiles();
CREATE TRIGGER profiles_updated_segments AFTER UPDATE ON nudge.profiles
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION nudge._on_profiles();

-- Erasure (GDPR art. 17, CCPA): deletes what pg_nudge holds about a user in
-- one transaction and keeps only a hash of their addresses on the suppression
-- list, so they are never mailed again. Rows in the application's own source
-- tables are the application's: listed, not touched.
CREATE FUNCTION nudge.forget(user_id text)
RETURNS TABLE (relation text, deleted bigint, note text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    who text := forget.user_id;
    addresses text[];
    n bigint;
BEGIN
    IF coalesce(who, '') = '' THEN
        RAISE EXCEPTION 'forget: user_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- every address we hold for them, as the suppression list keys it
    SELECT coalesce(array_agg(DISTINCT a), '{}') INTO addresses FROM (
        SELECT lower(btrim(p.email)) AS a FROM nudge.profiles p WHERE p.user_id = who AND p.email IS NOT NULL
        UNION SELECT lower(btrim(o.recipient)) FROM nudge.outbox o WHERE o.user_id = who
        UNION SELECT s.email FROM nudge.suppressions s WHERE s.user_id = who AND s.email NOT LIKE 'sha256:%') x
     WHERE a <> '';
    DELETE FROM nudge.suppressions s WHERE s.user_id = who OR s.email = ANY (addresses);
    INSERT INTO nudge.suppressions (email, user_id, reason)
    SELECT nudge._address_hash(a), '', 'erased' FROM unnest(addresses) a
    ON CONFLICT (email) DO NOTHING;
    relation := 'nudge.suppressions'; deleted := 0;
    note := cardinality(addresses) || ' address(es) kept as a hash only';
    RETURN NEXT;
    note := NULL;
    DELETE FROM nudge.events e WHERE e.user_id = who;            GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.events';        deleted := n; RETURN NEXT;
    DELETE FROM nudge.capture_queue q WHERE q.user_id = who;     GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.capture_queue'; deleted := n; RETURN NEXT;
    DELETE FROM nudge.profiles p WHERE p.user_id = who;          GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.profiles';      deleted := n; RETURN NEXT;
    DELETE FROM nudge.enrollments e WHERE e.user_id = who;       GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.enrollments';   deleted := n; RETURN NEXT;
    DELETE FROM nudge.journal j WHERE j.user_id = who;           GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.journal';       deleted := n; RETURN NEXT;
    DELETE FROM nudge.outbox o WHERE o.user_id = who;            GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.outbox';        deleted := n; RETURN NEXT;
    DELETE FROM nudge.subscriptions s WHERE s.user_id = who;     GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.subscriptions'; deleted := n; RETURN NEXT;
    DELETE FROM nudge.segment_members m WHERE m.user_id = who;   GET DIAGNOSTICS n = ROW_COUNT; relation := 'nudge.segment_members'; deleted := n; RETURN NEXT;
    FOR relation IN SELECT s.source::text FROM nudge.sources s WHERE s.source <> 'nudge.events'::regclass ORDER BY 1 LOOP
        deleted := NULL;
        note := 'the application''s table: its rows for this user are not touched';
        RETURN NEXT;
    END LOOP;
END
$$;

-- How an erased address is kept: nothing readable, still comparable.
CREATE FUNCTION nudge._address_hash(address text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'sha256:' || encode(sha256(convert_to(lower(btrim(address)), 'UTF8')), 'hex')
$$;

-- Capture runs as the inserting role (so that whatever converting its rows
-- calls runs with that role's rights) and switches to the extension's owner,
-- with a pinned search path, only for pg_nudge's own statements
-- (src/privilege.rs). It is not SECURITY DEFINER.

-- Event sources are read by privileged code (run_due, the worker, capture's
-- history reads). Reading a table runs no code of its owner's except casts of
-- its column types: these are the columns whose type (or a domain base, array
-- element, composite field or range subtype of it) has a cast written by a
-- role to a type sources are read as. add_source refuses such a table and
-- nudge._guard_sources refuses the DDL that would make a source one.
CREATE FUNCTION nudge._source_hazards(source regclass)
RETURNS TABLE (column_name name, type regtype, cast_function regprocedure)
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    WITH RECURSIVE types(attname, typ) AS (
        SELECT a.attname, a.atttypid FROM pg_attribute a
         WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT t.attname, x.typ
          FROM types t JOIN pg_type ty ON ty.oid = t.typ
         CROSS JOIN LATERAL (
               SELECT ty.typbasetype AS typ WHERE ty.typtype = 'd'
               UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
               UNION ALL SELECT f.atttypid FROM pg_attribute f
                WHERE ty.typrelid <> 0 AND f.attrelid = ty.typrelid AND f.attnum > 0 AND NOT f.attisdropped
               UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid) x)
    SELECT t.attname, t.typ::regtype, c.castfunc::regprocedure
      FROM types t JOIN pg_cast c ON c.castsource = t.typ
     WHERE c.castmethod = 'f' AND c.castfunc >= 16384
       AND c.casttarget IN ('text'::regtype, 'varchar'::regtype, 'timestamptz'::regtype, 'json'::regtype, 'jsonb'::regtype)
$$;

CREATE FUNCTION nudge._guard_sources() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, nudge, pg_temp AS $$
DECLARE
    h record;
BEGIN
    SELECT s.source, z.column_name, z.type, z.cast_function INTO h
      FROM nudge.sources s CROSS JOIN LATERAL nudge._source_hazards(s.source) z
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_nudge: % would make event source % unsafe to read: column % of type % has a user-defined cast %',
            tg_tag, h.source, h.column_name, h.type, h.cast_function
            USING ERRCODE = '42501',
                  HINT = 'pg_nudge reads event sources with its own rights and never runs a function another role wrote there; nudge.drop_source the table first';
    END IF;
    -- a mapped column renamed or dropped would break every later INSERT
    -- into the source; the ALTER is refused instead
    SELECT s.source, m.part, m.col INTO h
      FROM nudge.sources s
     CROSS JOIN LATERAL (SELECT * FROM (VALUES ('user_column', s.user_column), ('event_column', s.event_column),
                                               ('time_column', s.time_column), ('props_column', s.props_column)) v
                         -- a watched column: its events are named after it
                         UNION ALL SELECT 'watched column', w FROM unnest(s.changes) w) AS m(part, col)
     WHERE m.col IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.source::oid)
       AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = s.source AND a.attname = m.col AND a.attnum > 0 AND NOT a.attisdropped)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_nudge: % would leave event source % without its % %', tg_tag, h.source, h.part, quote_ident(h.col)
            USING ERRCODE = '55000',
                  HINT = 'keep the column, or map the table anew: nudge.drop_source, then nudge.add_source';
    END IF;
END
$$;
-- A source dropped (DROP TABLE, DROP SCHEMA ... CASCADE, DROP OWNED) is no
-- longer registered; nothing of ours goes with it.
CREATE FUNCTION nudge._forget_dropped_sources() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, nudge, pg_temp AS $$
DECLARE
    d record;
BEGIN
    FOR d IN
        SELECT s.source::oid AS relid, o.object_identity
          FROM pg_event_trigger_dropped_objects() o
          JOIN nudge.sources s ON s.source::oid = o.objid
         WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0
    LOOP
        DELETE FROM nudge.sources s WHERE s.source::oid = d.relid;
        RAISE NOTICE 'pg_nudge: % was an event source; it is no longer registered (its events already captured stay)', d.object_identity;
    END LOOP;
END
$$;
CREATE EVENT TRIGGER nudge_forget_dropped_sources ON sql_drop
    EXECUTE FUNCTION nudge._forget_dropped_sources();

CREATE EVENT TRIGGER nudge_guard_sources ON ddl_command_end
    WHEN TAG IN ('CREATE CAST', 'ALTER TABLE', 'ALTER TYPE', 'ALTER DOMAIN', 'CREATE DOMAIN')
    EXECUTE FUNCTION nudge._guard_sources();

-- Backends keep the compiled triggers until nudge.triggers changes, however it changes.
CREATE TRIGGER triggers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.triggers
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();
CREATE TRIGGER triggers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.trigger_versions
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();

CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.sources
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();

SELECT nudge.add_source('nudge.events', 'user_id', 'event', 'occurred_at', 'props');

-- pg_dump keeps what pg_nudge holds: definitions, sources, events, journeys,
-- messages, suppressions (the rows CREATE EXTENSION makes itself excepted).
SELECT pg_catalog.pg_extension_config_dump('nudge.events', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.profiles', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.wal_capture', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.templates', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.triggers', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.trigger_versions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.enrollments', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.segment_members', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.capture_queue', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.journal', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.suppressions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.user_sql', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.allocations', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.secrets', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.settings', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.received', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.user_sql_id', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.enrollments_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.journal_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.sources', 'WHERE source <> ''nudge.events''::regclass');

-- Roles (docs/architecture.md, "Security model"): each gets what it needs and no more.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_admin') THEN
        CREATE ROLE nudge_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_writer') THEN
        CREATE ROLE nudge_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_mailer') THEN
        CREATE ROLE nudge_mailer NOLOGIN;
    END IF;
END
$$;

-- Messages, and the journeys' reasons (a failed render quotes values), carry
-- what definers' queries returned: a member of nudge_admin reads only the
-- rows of trigger versions whose queries it could have run itself (it has
-- the privileges of each one's definer; a definer whose role is gone counts
-- as someone else). The mailer reads every message; our own code (the
-- extension's owner) is not subject to these policies.
CREATE FUNCTION nudge._may_read(trigger text, version int) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM nudge.user_sql u LEFT JOIN pg_roles r ON r.rolname = u.owner
         WHERE u.trigger = _may_read.trigger AND u.version = _may_read.version
           AND (r.oid IS NULL OR NOT pg_has_role(r.oid, 'USAGE')))
$$;
ALTER TABLE nudge.outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY mailer_reads_all ON nudge.outbox FOR SELECT TO nudge_mailer USING (true);
CREATE POLICY definers_data ON nudge.outbox FOR ALL TO nudge_admin
    USING (nudge._may_read(trigger, trigger_version));
ALTER TABLE nudge.enrollments ENABLE ROW LEVEL SECURITY;
CREATE POLICY definers_data ON nudge.enrollments FOR ALL TO nudge_admin
    USING (nudge._may_read(trigger, trigger_version));

-- Retention (nudge.retention, default 180 days; 'off' keeps everything):
-- deletes, at most `batch` rows per table per call, what is older than that
-- and finished: journal lines, ended journeys (but never a user's latest
-- journey of a trigger, which reentry "once" and cooldowns read), sent and
-- dead messages, and queued events the worker never took. Suppressions and
-- events are kept. The worker calls it hourly, one batch per transaction,
-- until a call comes back short.
CREATE FUNCTION nudge.apply_retention(batch int DEFAULT 10000)
RETURNS TABLE (relation text, deleted bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, nudge, pg_temp AS $$
DECLARE
    setting text := nudge._setting('nudge.retention', '180 days');
    keep interval;
    cutoff timestamptz;
BEGIN
    IF lower(btrim(setting)) = 'off' THEN
        RETURN;
    END IF;
    BEGIN
        keep := setting::interval;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow
                   OR syntax_error OR invalid_text_representation THEN
        RAISE EXCEPTION 'nudge.retention: % is not an interval (''180 days'') or ''off''', pg_catalog.quote_literal(setting)
            USING ERRCODE = '22023';
    END;
    IF keep < interval '1 day' THEN
        RAISE EXCEPTION 'nudge.retention: % is less than a day', pg_catalog.quote_literal(setting)
            USING ERRCODE = '22023',
                  HINT = 'journeys that wait longer than the retention would lose their history';
    END IF;
    IF batch IS NULL OR batch < 1 THEN
        RAISE EXCEPTION 'apply_retention: batch must be at least 1, got %', batch USING ERRCODE = '22023';
    END IF;
    cutoff := now() - keep;

    relation := 'journal';
    DELETE FROM nudge.journal j WHERE j.ctid = ANY (ARRAY(
        SELECT x.ctid FROM nudge.journal x
         WHERE x.recorded_at < cutoff
           AND NOT EXISTS (SELECT 1 FROM nudge.enrollments e
                            WHERE e.user_id = x.user_id AND e.id = x.enrollment_id AND e.state = 'waiting')
         LIMIT batch));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN NEXT;

    relation := 'enrollments';
    DELETE FROM nudge.enrollments e WHERE e.ctid = ANY (ARRAY(
        SELECT x.ctid FROM nudge.enrollments x
         WHERE x.state <> 'waiting' AND x.updated_at < cutoff
           AND EXISTS (SELECT 1 FROM nudge.enrollments n
                        WHERE n.user_id = x.user_id AND n.trigger = x.trigger AND n.entered_at > x.entered_at)
         LIMIT batch));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN NEXT;

    relation := 'outbox';
    DELETE FROM nudge.outbox o WHERE o.ctid = ANY (ARRAY(
        SELECT x.ctid FROM nudge.outbox x
         WHERE x.status IN ('sent', 'dead', 'cancelled') AND x.created_at < cutoff
         LIMIT batch));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN NEXT;

    relation := 'capture_queue';
    DELETE FROM nudge.capture_queue q WHERE q.ctid = ANY (ARRAY(
        SELECT x.ctid FROM nudge.capture_queue x WHERE x.queued_at < cutoff LIMIT batch));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN NEXT;

    -- a sender's ids are kept a week, whatever the retention: SDKs and
    -- providers retry within hours, and signed webhooks older than
    -- --webhook-max-age are refused before their ids are looked up
    relation := 'received';
    DELETE FROM nudge.received r WHERE r.ctid = ANY (ARRAY(
        SELECT x.ctid FROM nudge.received x
         WHERE x.received_at < now() - interval '7 days' LIMIT batch));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN NEXT;
END
$$;

-- The schema's grants are ours alone to give: a schema nudge that outlived an
-- earlier install (DROP EXTENSION keeps it) may still carry 0.2.0's CREATE
-- for nudge_admin, or anyone's.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
              WHERE n.nspname = 'nudge' AND a.grantee <> n.nspowner LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON SCHEMA nudge FROM %s',
                                  CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;
END
$$;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA nudge FROM PUBLIC;
GRANT USAGE ON SCHEMA nudge TO nudge_admin, nudge_writer, nudge_mailer;

-- nudge_admin: defines triggers, templates, sources and the profile query; reads
-- everything. No CREATE on the schema, no TRIGGER, TRUNCATE or REFERENCES
-- anywhere; the tables that name functions or relations (triggers and their
-- versions, user_sql, sources) are written only through our functions
-- (docs/security.md).
GRANT SELECT ON ALL TABLES IN SCHEMA nudge TO nudge_admin;
GRANT INSERT, UPDATE, DELETE ON
    nudge.events, nudge.profiles, nudge.templates, nudge.settings, nudge.suppressions, nudge.capture_queue
TO nudge_admin;
-- journeys, journal and messages are the engine's: an admin may cancel a message
GRANT DELETE ON nudge.outbox TO nudge_admin;
-- the key that signs unsubscribe links: whoever reads it can unsubscribe anyone
REVOKE ALL ON nudge.secrets FROM nudge_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA nudge TO nudge_admin;
-- the 0.1.0 capture functions' entry point: capture as the caller, for them only
REVOKE EXECUTE ON FUNCTION nudge._capture(text[], text[], timestamptz[], jsonb[]) FROM nudge_admin;
REVOKE EXECUTE ON FUNCTION nudge._profiles_changed(text[]), nudge._on_profiles() FROM nudge_admin;
REVOKE EXECUTE ON FUNCTION nudge._capture_changes(), nudge._changes_done() FROM nudge_admin;
-- the outbox protocol is the mailer's: run as the owner, it would read every message
REVOKE EXECUTE ON FUNCTION nudge.claim(int, interval, text), nudge.ack(bigint, text),
    nudge.ack_many(bigint[], text[]), nudge.fail(bigint, text, boolean), nudge.release(bigint[]),
    nudge.record_engagement(text, text, timestamptz, jsonb),
    nudge.record_webhook(text, text, text, text, timestamptz, jsonb, text) FROM nudge_admin;
-- the upgrade's own step
REVOKE EXECUTE ON FUNCTION nudge._secure_user_sql() FROM nudge_admin;
-- the worker's (or a superuser's): it deletes the engine's history
REVOKE EXECUTE ON FUNCTION nudge.apply_retention(int) FROM nudge_admin;
-- a cluster's (docs/citus.md): claim's part on a node hands messages out;
-- distribute and the nodes' set-up are a superuser's
REVOKE EXECUTE ON FUNCTION nudge._claim_here(int, interval, text), nudge.distribute(int),
    nudge._prepare_node(), nudge._on_nodes(text[], boolean), nudge._source_here(text, text, text, text, text, text),
    nudge._sources_to_nodes(regclass) FROM nudge_admin;

-- nudge_writer: tracks events (nudge.track, or INSERT / COPY into nudge.events).
GRANT EXECUTE ON FUNCTION nudge.track(text, text, jsonb, timestamptz) TO nudge_writer;
-- an application records the choices its users make in their preferences
GRANT EXECUTE ON FUNCTION nudge.subscribe(text, text, text), nudge.unsubscribe(text, text, text) TO nudge_writer;
GRANT INSERT ON nudge.events TO nudge_writer;
GRANT SELECT (id) ON nudge.events TO nudge_writer;  -- track's INSERT ... RETURNING id
-- nudge-gateway's way in: batches of events and profiles, de-duplicated
GRANT EXECUTE ON FUNCTION nudge.ingest(text, text[], text[], text[], timestamptz[], jsonb[]),
    nudge.identify(text[], text[], text[], jsonb[], jsonb[]) TO nudge_writer;

-- nudge_mailer: claims, acks, fails, records engagement, reads the outbox.
GRANT SELECT ON nudge.outbox TO nudge_mailer;
GRANT EXECUTE ON FUNCTION
    nudge.claim(int, interval, text),
    nudge.ack(bigint, text),
    nudge.ack_many(bigint[], text[]),
    nudge.fail(bigint, text, boolean),
    nudge.release(bigint[]),
    nudge.record_engagement(text, text, timestamptz, jsonb),
    nudge.unsubscribe(text),
    nudge.follow(text),
    nudge.opened(text),
    nudge.record_webhook(text, text, text, text, timestamptz, jsonb, text),
    nudge.outbox_metrics(),
    nudge.worker_status()
TO nudge_mailer;
