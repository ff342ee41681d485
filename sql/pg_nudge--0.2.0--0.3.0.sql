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

ALTER TABLE nudge.user_sql ADD COLUMN config text[];


ALTER FUNCTION nudge._capture_rows() SECURITY INVOKER;

ALTER FUNCTION nudge._watched_events() SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.add_source(regclass, text, text, text, text, text) SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.drop_source(regclass) SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.explain(text, text) SET search_path = pg_catalog, nudge, pg_temp;
ALTER FUNCTION nudge.trigger_stats(timestamptz, timestamptz) SET search_path = pg_catalog, nudge, pg_temp;

CREATE FUNCTION nudge."_secure_user_sql"() RETURNS bigint
STRICT LANGUAGE c AS 'MODULE_PATHNAME', '_secure_user_sql_wrapper';

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
END
$$;
CREATE EVENT TRIGGER nudge_guard_sources ON ddl_command_end
    WHEN TAG IN ('CREATE CAST', 'ALTER TABLE', 'ALTER TYPE', 'ALTER DOMAIN', 'CREATE DOMAIN')
    EXECUTE FUNCTION nudge._guard_sources();

-- Grants: see finalize.sql.
REVOKE ALL ON FUNCTION nudge._secure_user_sql() FROM PUBLIC;
REVOKE CREATE ON SCHEMA nudge FROM nudge_admin;
REVOKE ALL ON ALL TABLES IN SCHEMA nudge FROM nudge_admin;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA nudge FROM nudge_admin;
REVOKE ALL ON FUNCTION nudge._source_hazards(regclass), nudge._guard_sources() FROM PUBLIC;
GRANT SELECT ON ALL TABLES IN SCHEMA nudge TO nudge_admin;
GRANT INSERT, UPDATE, DELETE ON
    nudge.events, nudge.profiles, nudge.templates, nudge.settings, nudge.suppressions,
    nudge.enrollments, nudge.journal, nudge.outbox, nudge.allocations, nudge.capture_queue
TO nudge_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA nudge TO nudge_admin;
-- the 0.1.0 capture functions' entry point: capture as the caller, for them only
REVOKE EXECUTE ON FUNCTION nudge._capture(text[], text[], timestamptz[], jsonb[]) FROM nudge_admin;
REVOKE EXECUTE ON FUNCTION nudge._secure_user_sql() FROM nudge_admin;

-- last: the grant above reached the generated functions too
SELECT nudge._secure_user_sql();
