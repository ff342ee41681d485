-- pg_nudge 0.2.0 -> 0.3.0: safe to install in someone else's database
-- (issue 10, docs/security.md).
-- - nudge_admin loses CREATE on the schema and TRIGGER, TRUNCATE, REFERENCES
--   and direct writes on the tables that name functions or relations
--   (triggers, trigger_versions, user_sql, sources): our functions write them.
-- - Our SQL functions pin search_path = pg_catalog, nudge, pg_temp.
-- - Capture is no longer SECURITY DEFINER: it runs as the inserting role and
--   switches to the extension's owner for its own statements only.
-- - Generated user-SQL functions: no EXECUTE for PUBLIC, pg_temp last in their
--   search path, their settings recorded and checked at every call, run as
--   their definer; the profile query becomes one of them (nudge._profile goes).
-- - Event sources whose columns have user-defined casts are refused, and so is
--   DDL that would give a source one (event trigger nudge_guard_sources).
-- - Nothing of ours depends on a source any more (nudge.all_events reads the
--   union through nudge._all_events()); a dropped source is unregistered; a
--   mapped column cannot be renamed or dropped; pg_dump keeps our data.
-- - Objects in schema nudge that pg_nudge did not create stop the update.

-- 0.2.0 let nudge_admin create in schema nudge and put triggers on our
-- tables: privileged code would find such objects. The update refuses to go
-- on while any is there, and names them.
DO $$
DECLARE
    foreign_objects text;
BEGIN
    SELECT string_agg(d, ', ' ORDER BY d) INTO foreign_objects FROM (
        SELECT 'function ' || p.oid::regprocedure AS d FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'nudge'::regnamespace
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                            WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid AND e.deptype = 'e')
           AND NOT EXISTS (SELECT 1 FROM nudge.user_sql u WHERE pg_catalog.to_regprocedure(u.function || '(text)') = p.oid)
           AND p.oid <> coalesce(pg_catalog.to_regprocedure('nudge._profile(text)'), 0)
        UNION ALL
        SELECT 'relation ' || c.oid::regclass FROM pg_catalog.pg_class c
         WHERE c.relnamespace = 'nudge'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'f', 'p', 'S')
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                            WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid AND e.deptype IN ('e', 'i', 'a'))
        UNION ALL
        SELECT 'type ' || t.oid::regtype FROM pg_catalog.pg_type t
         WHERE t.typnamespace = 'nudge'::regnamespace AND t.typrelid = 0 AND t.typcategory <> 'A'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                            WHERE e.classid = 'pg_type'::regclass AND e.objid = t.oid AND e.deptype = 'e')
        UNION ALL
        SELECT 'operator ' || o.oid::regoperator FROM pg_catalog.pg_operator o
         WHERE o.oprnamespace = 'nudge'::regnamespace
        UNION ALL
        SELECT 'trigger ' || t.tgname || ' on ' || t.tgrelid::regclass FROM pg_catalog.pg_trigger t
          JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'nudge'::regnamespace AND NOT t.tgisinternal
           AND t.tgfoid NOT IN ('nudge._triggers_changed()'::regprocedure, 'nudge._capture_rows()'::regprocedure)) x;
    IF foreign_objects IS NOT NULL THEN
        RAISE EXCEPTION 'pg_nudge 0.3.0: schema nudge holds objects pg_nudge did not create: %', foreign_objects
            USING ERRCODE = '42501',
                  HINT = 'under 0.2.0 nudge_admin could create them, and privileged code would find them: review and drop them, then update again';
    END IF;
END
$$;

ALTER TABLE nudge.user_sql ADD COLUMN config text[];


ALTER FUNCTION nudge._capture_rows() SECURITY INVOKER;

ALTER FUNCTION nudge._watched_events() SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.add_source(regclass, text, text, text, text, text) SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.drop_source(regclass) SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.explain(text, text) SET search_path = pg_catalog, nudge, pg_temp;

CREATE FUNCTION nudge."_secure_user_sql"() RETURNS bigint
STRICT LANGUAGE c AS 'MODULE_PATHNAME', '_secure_user_sql_wrapper';

CREATE FUNCTION nudge."_events_sql"() RETURNS TEXT
STRICT STABLE
LANGUAGE c AS 'MODULE_PATHNAME', '_events_sql_wrapper';

-- nudge.all_events no longer depends on the sources (see finalize.sql)
DROP VIEW IF EXISTS nudge.all_events;
CREATE FUNCTION nudge."_all_events"("events" TEXT[] DEFAULT NULL) RETURNS TABLE (
    "user_id" TEXT,
    "event" TEXT,
    "occurred_at" timestamp with time zone,
    "props" jsonb
)
STABLE
LANGUAGE c AS 'MODULE_PATHNAME', '_all_events_wrapper';
CREATE VIEW nudge.all_events AS SELECT * FROM nudge._all_events(NULL);

-- goal events read through nudge._all_events, each source as its owner
CREATE OR REPLACE FUNCTION nudge.trigger_stats(from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (
    trigger text, arm text,
    entered bigint, exited bigint, suppressed bigint, suppressed_by jsonb, failed bigint,
    held_out bigint, sent bigint, delivered bigint, opened bigint, clicked bigint,
    converted bigint, conversion_rate float8, revenue numeric,
    uplift float8, uplift_ci_low float8, uplift_ci_high float8, p_value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    WITH e AS (
        SELECT en.id, en.trigger, en.user_id, en.state, en.reason, en.message_key, en.sent_at,
               coalesce(en.variant, 'default') AS arm
          FROM nudge.enrollments en
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
        SELECT e.trigger, e.arm,
               count(*) AS entered,
               count(*) FILTER (WHERE e.state = 'exited') AS exited,
               count(*) FILTER (WHERE e.state = 'suppressed') AS suppressed,
               count(*) FILTER (WHERE e.state = 'failed') AS failed,
               count(*) FILTER (WHERE e.state = 'held_out') AS held_out,
               count(*) FILTER (WHERE e.state = 'sent') AS sent,
               count(o.delivered_at) AS delivered,
               count(o.opened_at) AS opened,
               count(o.clicked_at) AS clicked,
               count(a.id) AS converted,
               coalesce(sum(a.revenue), 0) AS revenue
          FROM e
          LEFT JOIN nudge.outbox o ON o.message_key = e.message_key AND o.user_id = e.user_id
          LEFT JOIN attributed a ON a.id = e.id
         GROUP BY e.trigger, e.arm),
    reasons AS (
        SELECT r.trigger, r.arm, jsonb_object_agg(r.rule, r.n) AS suppressed_by
          FROM (SELECT e.trigger, e.arm,
                       CASE WHEN e.reason LIKE 'address % suppressed%' THEN 'suppression list'
                            ELSE split_part(e.reason, ':', 1) END AS rule,
                       count(*) AS n
                  FROM e WHERE e.state = 'suppressed' GROUP BY 1, 2, 3) r
         GROUP BY r.trigger, r.arm)
    SELECT a.trigger, a.arm, a.entered, a.exited, a.suppressed, coalesce(r.suppressed_by, '{}'), a.failed,
           a.held_out, a.sent, a.delivered, a.opened, a.clicked,
           a.converted, a.converted::float8 / nullif(a.sent + a.held_out, 0), a.revenue,
           u.uplift, u.ci_low, u.ci_high, u.p_value
      FROM arms a
      LEFT JOIN reasons r ON r.trigger = a.trigger AND r.arm = a.arm
      LEFT JOIN arms h ON h.trigger = a.trigger AND h.arm = 'holdout' AND a.arm <> 'holdout'
      LEFT JOIN LATERAL nudge._uplift(a.converted, a.sent, h.converted, h.held_out) u ON h.trigger IS NOT NULL
     ORDER BY a.trigger, a.arm
$$;

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
     CROSS JOIN LATERAL (VALUES ('user_column', s.user_column), ('event_column', s.event_column),
                                ('time_column', s.time_column), ('props_column', s.props_column)) AS m(part, col)
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

CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.sources
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();

-- pg_dump keeps what pg_nudge holds
SELECT pg_catalog.pg_extension_config_dump('nudge.events', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.profiles', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.templates', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.triggers', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.trigger_versions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.enrollments', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.capture_queue', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.journal', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.suppressions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.user_sql', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.allocations', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.settings', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.user_sql_id', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.enrollments_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.journal_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.sources', 'WHERE source <> ''nudge.events''::regclass');

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

-- Grants: see finalize.sql.
REVOKE ALL ON FUNCTION nudge._secure_user_sql() FROM PUBLIC;
REVOKE ALL ON FUNCTION nudge._may_read(text, int) FROM PUBLIC;
GRANT USAGE ON SCHEMA nudge TO nudge_admin, nudge_writer, nudge_mailer;
REVOKE ALL ON ALL TABLES IN SCHEMA nudge FROM nudge_admin;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA nudge FROM nudge_admin;
REVOKE ALL ON FUNCTION nudge._source_hazards(regclass), nudge._guard_sources(), nudge._forget_dropped_sources(),
    nudge._all_events(text[]), nudge._events_sql() FROM PUBLIC;
GRANT SELECT ON ALL TABLES IN SCHEMA nudge TO nudge_admin;
GRANT INSERT, UPDATE, DELETE ON
    nudge.events, nudge.profiles, nudge.templates, nudge.settings, nudge.suppressions, nudge.capture_queue
TO nudge_admin;
-- journeys, journal and messages are the engine's: an admin may cancel a message
GRANT DELETE ON nudge.outbox TO nudge_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA nudge TO nudge_admin;
-- the 0.1.0 capture functions' entry point: capture as the caller, for them only
REVOKE EXECUTE ON FUNCTION nudge._capture(text[], text[], timestamptz[], jsonb[]) FROM nudge_admin;
-- the outbox protocol is the mailer's: run as the owner, it would read every message
REVOKE EXECUTE ON FUNCTION nudge.claim(int, interval, text), nudge.ack(bigint, text),
    nudge.ack_many(bigint[], text[]), nudge.fail(bigint, text, boolean), nudge.release(bigint[]),
    nudge.record_engagement(text, text, timestamptz, jsonb) FROM nudge_admin;
REVOKE EXECUTE ON FUNCTION nudge._secure_user_sql() FROM nudge_admin;

-- last: the grant above reached the generated functions too
SELECT nudge._secure_user_sql();
