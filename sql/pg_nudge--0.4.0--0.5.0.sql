-- pg_nudge 0.4.0 -> 0.5.0: what goes out is what the rules say when it
-- goes out (issue 12).
-- - outbox.status may be 'cancelled', with the rule that cancelled it in
--   outbox.rule ('suppressed', 'exited', 'trigger_dropped').
-- - outbox.checked_at: a message held for later is claimable only once its
--   exit events were re-checked near its time (run_due does it).
-- - outbox.scheduled_at: when a message was meant to go; caps count it
--   (claiming moves available_at to the lease's end).
-- - claim cancels messages to suppressed addresses or of dropped triggers,
--   and holds those of paused triggers.

-- a message decided later than its trigger's expire_after is 'expired'
ALTER TABLE nudge.enrollments DROP CONSTRAINT enrollments_state_check;
ALTER TABLE nudge.enrollments ADD CONSTRAINT enrollments_state_check
    CHECK (state IN ('waiting', 'exited', 'sent', 'held_out', 'failed', 'suppressed', 'cancelled', 'expired'));
ALTER TABLE nudge.outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE nudge.outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'claimed', 'sent', 'dead', 'cancelled'));
ALTER TABLE nudge.outbox
    ADD COLUMN rule text,
    ADD COLUMN checked_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN scheduled_at timestamptz NOT NULL DEFAULT now();
-- what is already there was checked when written, and was meant to go when
-- it went (or, not yet sent, at its available time)
UPDATE nudge.outbox
   SET checked_at = created_at,
       scheduled_at = CASE WHEN status = 'sent' THEN coalesce(sent_at, available_at) ELSE available_at END;

CREATE OR REPLACE FUNCTION nudge.claim(batch int DEFAULT 10, lease interval DEFAULT '5 minutes', consumer text DEFAULT NULL)
RETURNS SETOF nudge.outbox
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    candidates tid[];
BEGIN
    candidates := ARRAY(
        SELECT c.ctid
          FROM nudge.outbox c
         WHERE c.status IN ('pending', 'claimed') AND c.available_at <= now()
           AND (c.status = 'claimed' OR c.checked_at >= c.available_at - interval '5 minutes')
           AND NOT EXISTS (SELECT 1 FROM nudge.triggers t WHERE t.name = c.trigger AND t.status = 'paused')
         ORDER BY c.priority DESC, c.available_at, c.id
         LIMIT greatest(coalesce(batch, 0), 0)
           FOR UPDATE SKIP LOCKED);
    -- a cancelled row's old version is gone for the claim below; its journey
    -- says why (trigger_stats does not count it as sent). A batch that was all
    -- cancelled comes back short: drop_trigger cancels its own messages in
    -- one statement, so a long run of them is not left to claim.
    WITH x AS (
        UPDATE nudge.outbox o
           SET status = 'cancelled', rule = x.rule, last_error = x.why
          FROM (SELECT c.ctid AS row_id,
                       CASE WHEN t.name IS NULL THEN 'trigger_dropped' ELSE 'suppressed' END AS rule,
                       CASE WHEN t.name IS NULL THEN 'trigger ' || c.trigger || ' was dropped'
                            ELSE 'address suppressed: ' || s.reason END AS why
                  FROM nudge.outbox c
                  LEFT JOIN nudge.triggers t ON t.name = c.trigger
                  LEFT JOIN LATERAL (SELECT s.reason FROM nudge.suppressions s
                                      WHERE s.email = lower(btrim(c.recipient)) OR s.user_id = c.user_id
                                      LIMIT 1) s ON true
                 WHERE c.ctid = ANY (candidates)
                   AND (t.name IS NULL OR s.reason IS NOT NULL)) x
         WHERE o.ctid = x.row_id
        RETURNING o.user_id, o.enrollment_id, o.rule, o.last_error)
    UPDATE nudge.enrollments e
       SET state = CASE WHEN x.rule = 'suppressed' THEN 'suppressed' ELSE 'cancelled' END,
           reason = x.last_error || ' (found before the message went out)', updated_at = now()
      FROM x
     WHERE e.user_id = x.user_id AND e.id = x.enrollment_id;
    RETURN QUERY
    UPDATE nudge.outbox o
       SET status = 'claimed', attempts = o.attempts + 1, claimed_by = consumer,
           available_at = now() + greatest(lease, interval '0')
     WHERE o.ctid = ANY (candidates)
    RETURNING o.*;
END
$$;

CREATE OR REPLACE FUNCTION nudge.outbox_metrics()
RETURNS TABLE (status text, messages bigint, oldest_age interval)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- oldest_age: how long the oldest message in that status has existed
    SELECT s.status, count(o.id), now() - min(o.created_at)
      FROM unnest(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled']) AS s(status)
      LEFT JOIN nudge.outbox o ON o.status = s.status
     GROUP BY s.status
     ORDER BY array_position(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled'], s.status)
$$;

CREATE OR REPLACE FUNCTION nudge.apply_retention(batch int DEFAULT 10000)
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
END
$$;

-- backtest takes the live trigger's name, to draw experiment arms as it does
DROP FUNCTION nudge.backtest(jsonb, timestamptz, timestamptz);
CREATE FUNCTION nudge."backtest"(
	"definition" jsonb, /* JsonB */
	"from_ts" timestamp with time zone, /* TimestampWithTimeZone */
	"to_ts" timestamp with time zone, /* TimestampWithTimeZone */
	"trigger_name" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"outcome" TEXT,  /* String */
	"journeys" bigint,  /* i64 */
	"sample_users" TEXT[]  /* Vec < String > */
)
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'backtest_wrapper';
REVOKE ALL ON FUNCTION nudge.backtest(jsonb, timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.backtest(jsonb, timestamptz, timestamptz, text) TO nudge_admin;

-- explain: an unknown trigger is an error (42704); expired, cancelled and
-- re-checked exits are shown
CREATE OR REPLACE FUNCTION nudge.explain(trigger text, user_id text)
RETURNS TABLE (at timestamptz, step text, detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
BEGIN
    -- a misspelled name is an error, not an empty answer
    IF NOT EXISTS (SELECT 1 FROM nudge.trigger_versions v WHERE v.trigger = explain.trigger) THEN
        RAISE EXCEPTION 'explain: no trigger named "%"', explain.trigger
              USING ERRCODE = 'undefined_object',
                    HINT = 'nudge.triggers lists the triggers; a dropped one is still explained.';
    END IF;
    RETURN QUERY
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
           AND (e.state IN ('sent', 'held_out', 'suppressed', 'failed', 'expired', 'cancelled')
                OR e.state = 'exited' AND e.reason LIKE '%(found %')) s
     ORDER BY s.at, s.o, s.id;
END
$$;

-- run_due with its account: how each taken journey ended, and what is still due
CREATE FUNCTION nudge."run_due_report"(
	"as_of" timestamp with time zone DEFAULT now(), /* TimestampWithTimeZone */
	"max_messages" INT DEFAULT 1000 /* i32 */
) RETURNS TABLE (
	"taken" bigint,  /* i64 */
	"written" bigint,  /* i64 */
	"suppressed" bigint,  /* i64 */
	"exited" bigint,  /* i64 */
	"held_out" bigint,  /* i64 */
	"expired" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"retrying" bigint,  /* i64 */
	"still_due" bigint  /* i64 */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'run_due_report_wrapper';
REVOKE ALL ON FUNCTION nudge.run_due_report(timestamptz, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.run_due_report(timestamptz, int) TO nudge_admin;
