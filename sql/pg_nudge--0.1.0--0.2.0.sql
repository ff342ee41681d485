-- pg_nudge 0.1.0 -> 0.2.0: the speed of issue 6.
-- Capture: a Rust trigger reads each source's transition table (no plpgsql
-- function per source); backends keep compiled triggers until nudge.triggers
-- or nudge.trigger_versions change; an index for a user's waiting journeys;
-- journeys' "entered" steps and run_due's outcomes come from the enrollments
-- instead of the journal.
-- Deferred capture (nudge.deferred_capture): nudge.capture_queue and
-- nudge.capture_pending().
-- Outbox: nudge.ack_many(bigint[], text[]) acknowledges a batch in one
-- statement; nudge.claim no longer hash-joins the whole outbox per call.

CREATE INDEX enrollments_waiting ON nudge.enrollments (user_id, trigger, due_at) WHERE state = 'waiting';
-- every state change wrote an entry in it; nothing hot reads it
DROP INDEX nudge.enrollments_trigger_state;

CREATE TABLE nudge.capture_queue (
    user_id     text        NOT NULL,
    event       text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    props       jsonb       NOT NULL,
    queued_at   timestamptz NOT NULL
);
GRANT ALL ON nudge.capture_queue TO nudge_admin;
CREATE FUNCTION nudge."capture_pending"("max_events" bigint DEFAULT 1000000) RETURNS bigint
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'capture_pending_wrapper';
REVOKE ALL ON FUNCTION nudge.capture_pending(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.capture_pending(bigint) TO nudge_admin;

CREATE FUNCTION nudge."_capture_rows"() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '_capture_rows_wrapper';
ALTER FUNCTION nudge._capture_rows() SECURITY DEFINER;  -- its SQL runs under a fixed search_path (spi_util::with_safe_search_path)

CREATE FUNCTION nudge."_triggers_changed"() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '_triggers_changed_wrapper';
CREATE TRIGGER triggers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.triggers
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();
CREATE TRIGGER triggers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nudge.trigger_versions
    FOR EACH STATEMENT EXECUTE FUNCTION nudge._triggers_changed();

-- Every source moves to the Rust trigger, with the same column mapping.
DO $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT * FROM nudge.sources LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS nudge_capture ON %s', s.source);
        EXECUTE format('DROP FUNCTION IF EXISTS nudge.%I()', '_capture_' || s.source::oid);
        EXECUTE format('CREATE TRIGGER nudge_capture AFTER INSERT ON %s REFERENCING NEW TABLE AS nudge_new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION nudge._capture_rows(%L, %L, %L, %L, %L)',
                       s.source, s.user_column, coalesce(s.event_column, ''), coalesce(s.time_column, ''),
                       coalesce(s.props_column, ''), coalesce(s.event_name, ''));
    END LOOP;
END
$$;

-- explain now reads entries and run_due's outcomes from the enrollments: the
-- old journal lines would repeat them.
DELETE FROM nudge.journal
 WHERE step IN ('entered', 'sent', 'held_out', 'suppressed', 'failed')
    OR step = 'exited' AND detail LIKE '%(found at send time)';
CREATE OR REPLACE FUNCTION nudge.explain(trigger text, user_id text)
RETURNS TABLE (at timestamptz, step text, detail text)
LANGUAGE sql STABLE AS $$
    SELECT s.at, s.step, s.detail FROM (
        SELECT e.entered_at AS at, 0 AS o, e.id, 'entered' AS step,
               'v' || e.trigger_version || CASE WHEN e.key <> '' THEN ' key ' || e.key ELSE '' END
               || ', due ' || to_char(e.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
               || coalesce(', arm ' || e.variant, '') AS detail
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id
        UNION ALL
        SELECT j.at, 1, j.id, j.step, j.detail
          FROM nudge.journal j
         WHERE j.trigger = explain.trigger AND j.user_id = explain.user_id
        UNION ALL
        -- what run_due decided: the enrollment's state and reason
        SELECT CASE WHEN e.state = 'exited' THEN e.exited_at ELSE e.due_at END, 2, e.id, e.state, e.reason
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id
           AND (e.state IN ('sent', 'held_out', 'suppressed', 'failed')
                OR e.state = 'exited' AND e.reason LIKE '%(found at send time)')) s
     ORDER BY s.at, s.o, s.id
$$;

CREATE FUNCTION nudge.ack_many(ids bigint[], provider_message_ids text[] DEFAULT NULL) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad record;
    n int;
BEGIN
    SELECT a.id, o.status INTO bad
      FROM unnest(ids) AS a(id) LEFT JOIN nudge.outbox o ON o.id = a.id
     WHERE o.status IS NULL OR o.status NOT IN ('claimed', 'sent')
     LIMIT 1;
    IF FOUND AND bad.status IS NULL THEN
        RAISE EXCEPTION 'ack_many: no message with id %', bad.id;
    ELSIF FOUND THEN
        RAISE EXCEPTION 'ack_many: message % is %, not claimed (claim it first)', bad.id, bad.status;
    END IF;
    UPDATE nudge.outbox o
       SET status = 'sent', sent_at = now(), provider_message_id = a.provider_message_id, last_error = NULL
      FROM unnest(ids, provider_message_ids) AS a(id, provider_message_id)
     WHERE o.id = a.id AND o.status = 'claimed';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION nudge._capture_rows(), nudge._triggers_changed(), nudge.ack_many(bigint[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge._capture_rows(), nudge._triggers_changed(), nudge.ack_many(bigint[], text[]) TO nudge_admin;
GRANT EXECUTE ON FUNCTION nudge.ack_many(bigint[], text[]) TO nudge_mailer;

-- The rows are picked by the index in priority order and updated by their
-- ctid (a TID scan): joined on the key instead, a generic plan (which cannot
-- know the batch size) hash-joined the whole outbox per claim. plpgsql, so
-- that the plan is kept for the session (a SQL function plans every call).
CREATE OR REPLACE FUNCTION nudge.claim(batch int DEFAULT 10, lease interval DEFAULT '5 minutes', consumer text DEFAULT NULL)
RETURNS SETOF nudge.outbox
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    UPDATE nudge.outbox o
       SET status = 'claimed', attempts = o.attempts + 1, claimed_by = consumer,
           available_at = now() + greatest(lease, interval '0')
     WHERE o.ctid = ANY (ARRAY(
           SELECT c.ctid
             FROM nudge.outbox c
            WHERE c.status IN ('pending', 'claimed') AND c.available_at <= now()
            ORDER BY c.priority DESC, c.available_at, c.id
            LIMIT greatest(batch, 0)
              FOR UPDATE SKIP LOCKED))
    RETURNING o.*;
END
$$;

-- worker_status gains `queued` (events deferred capture has not enrolled yet)
DROP FUNCTION nudge.worker_status();
CREATE FUNCTION nudge."worker_status"() RETURNS TABLE (
    "running" bool,
    "last_pass" timestamp with time zone,
    "passes" bigint,
    "messages" bigint,
    "errors" bigint,
    "lag" interval,
    "queued" bigint
)
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION nudge.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.worker_status() TO nudge_admin;
