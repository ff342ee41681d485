-- pg_nudge 0.3.0 -> 0.4.0: never break the application, never lose data
-- (issue 11).
-- - A lookup that fails in a way that may pass (the user-SQL timeout, a lock,
--   a deadlock) leaves the enrollment waiting, tried again with backoff
--   (nudge.retry_base_seconds, nudge.retry_max_seconds, nudge.max_attempts):
--   enrollments.attempts counts those passes.
-- - worker_status() also counts failed and retried enrollments.
-- - nudge.apply_retention(): journal, ended journeys, sent and dead messages
--   and stale queued events older than nudge.retention (default 180 days)
--   are deleted in batches by the worker.

ALTER TABLE nudge.enrollments ADD COLUMN attempts int NOT NULL DEFAULT 0;

DROP FUNCTION nudge.worker_status();
CREATE FUNCTION nudge."worker_status"() RETURNS TABLE (
	"running" bool,
	"last_pass" timestamp with time zone,
	"passes" bigint,
	"messages" bigint,
	"errors" bigint,
	"lag" interval,
	"queued" bigint,
	"failed" bigint,
	"retried" bigint
)
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION nudge.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.worker_status() TO nudge_admin;

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
         WHERE x.status IN ('sent', 'dead') AND x.created_at < cutoff
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
REVOKE ALL ON FUNCTION nudge.apply_retention(int) FROM PUBLIC;
