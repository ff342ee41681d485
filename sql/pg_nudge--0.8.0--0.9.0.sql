-- pg_nudge 0.8.0 -> 0.9.0: journeys of several steps (docs/reference.md, "Steps").

-- each step of a journey is an enrollment of its own
ALTER TABLE nudge.enrollments ADD COLUMN step int NOT NULL DEFAULT 0;
ALTER TABLE nudge.enrollments DROP CONSTRAINT enrollments_user_id_trigger_key_entered_at_key;
ALTER TABLE nudge.enrollments ADD CONSTRAINT enrollments_user_id_trigger_key_entered_at_step_key
    UNIQUE (user_id, trigger, key, entered_at, step);
-- a step whose branch sent the journey past it
ALTER TABLE nudge.enrollments DROP CONSTRAINT enrollments_state_check;
ALTER TABLE nudge.enrollments ADD CONSTRAINT enrollments_state_check
    CHECK (state IN ('waiting', 'exited', 'sent', 'held_out', 'failed', 'suppressed', 'cancelled', 'expired', 'skipped'));

-- trigger_stats and compare_arms gain a row per step (and their columns
-- step, skipped): their row types change, so they are made anew
DROP VIEW nudge.trigger_stats;
DROP FUNCTION nudge.trigger_stats(timestamptz, timestamptz);
DROP FUNCTION nudge.compare_arms(timestamptz, timestamptz);
DROP FUNCTION nudge.explain(text, text);
DROP FUNCTION nudge.backtest(jsonb, timestamptz, timestamptz, text);

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
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
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
     ORDER BY a.trigger, a.place, a.step, a.arm
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

-- backtest reports per step
CREATE FUNCTION nudge."backtest"(
	"definition" jsonb, /* JsonB */
	"from_ts" timestamp with time zone, /* TimestampWithTimeZone */
	"to_ts" timestamp with time zone, /* TimestampWithTimeZone */
	"trigger_name" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"outcome" TEXT,  /* String */
	"journeys" bigint,  /* i64 */
	"sample_users" TEXT[]  /* Vec < String > */,
	"step" TEXT  /* String */
)
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'backtest_wrapper';

REVOKE ALL ON FUNCTION nudge._step_name(text, int, int), nudge.explain(text, text),
    nudge.trigger_stats(timestamptz, timestamptz), nudge.compare_arms(timestamptz, timestamptz),
    nudge.backtest(jsonb, timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge._step_name(text, int, int), nudge.explain(text, text),
    nudge.trigger_stats(timestamptz, timestamptz), nudge.compare_arms(timestamptz, timestamptz),
    nudge.backtest(jsonb, timestamptz, timestamptz, text) TO nudge_admin;
GRANT SELECT ON nudge.trigger_stats TO nudge_admin;

-- segment entry (docs/reference.md, "Segment entry"): who is in each segment
CREATE TABLE nudge.segment_members (
    trigger text        NOT NULL,
    user_id text        NOT NULL,
    member  boolean     NOT NULL,
    -- when the membership last changed (the time of the write or event that changed it)
    since   timestamptz NOT NULL,
    -- a date on the profile (`"on": {"date": "profile.birthday"}`): the date
    value   text,
    PRIMARY KEY (user_id, trigger)
);
SELECT pg_catalog.pg_extension_config_dump('nudge.segment_members', '');
REVOKE ALL ON nudge.segment_members FROM PUBLIC;
GRANT SELECT ON nudge.segment_members TO nudge_admin;

CREATE FUNCTION nudge."_profiles_changed"(
	"users" TEXT[] /* Vec < Option < String > > */
) RETURNS void
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_profiles_changed_wrapper';
REVOKE ALL ON FUNCTION nudge._profiles_changed(text[]) FROM PUBLIC;

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

REVOKE ALL ON FUNCTION nudge._on_profiles() FROM PUBLIC;

-- forget erases segment membership too
CREATE OR REPLACE FUNCTION nudge.forget(user_id text)
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

-- changes as events (docs/reference.md, "Changes as events")
ALTER TABLE nudge.sources ADD COLUMN changes text[];
CREATE FUNCTION nudge."_watch_changes"(
	"source" oid, /* pg_sys :: Oid */
	"columns" TEXT[] /* Vec < Option < String > > */
) RETURNS void
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_watch_changes_wrapper';
CREATE FUNCTION nudge."_capture_changes"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_capture_changes_wrapper';
CREATE FUNCTION nudge."_changes_done"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_changes_done_wrapper';
-- Changes as events (docs/reference.md, "Changes as events"): an UPDATE that
-- changes one of these columns of a registered source emits <column>_changed.
CREATE FUNCTION nudge.watch_changes(source regclass, columns text[]) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, nudge, pg_temp AS $$ SELECT nudge._watch_changes(source::oid, columns) $$;
REVOKE ALL ON FUNCTION nudge._watch_changes(oid, text[]), nudge._capture_changes(), nudge._changes_done(),
    nudge.watch_changes(regclass, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge._watch_changes(oid, text[]), nudge.watch_changes(regclass, text[]) TO nudge_admin;

-- a watched column is guarded as a mapped one is
CREATE OR REPLACE FUNCTION nudge._guard_sources() RETURNS event_trigger
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

-- preview renders any step of a journey
DROP FUNCTION nudge.preview(text, text);
CREATE FUNCTION nudge."preview"(
	"trigger" TEXT, /* & str */
	"user_id" TEXT, /* & str */
	"step" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"recipient" TEXT,  /* String */
	"subject" TEXT,  /* String */
	"html" TEXT,  /* String */
	"text_body" TEXT  /* Option < String > */
)
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'preview_wrapper';
REVOKE ALL ON FUNCTION nudge.preview(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.preview(text, text, text) TO nudge_admin;
