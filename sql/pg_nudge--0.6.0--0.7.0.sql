-- pg_nudge 0.6.0 -> 0.7.0: the way in for nudge-gateway (docs/gateway.md):
-- nudge.ingest and nudge.identify (batches of events and profiles,
-- de-duplicated by the sender's id), nudge.record_webhook (provider reports,
-- replays harmless), the ledger nudge.received, and worker_status for the
-- mailer role (the gateway's /metrics); nudge.follow and nudge.opened for
-- open and click tracking.
\echo Use "ALTER EXTENSION pg_nudge UPDATE TO '0.7.0'" to load this file. \quit


-- What arrived with an id, per source ('segment', 'amplitude', 'mixpanel',
-- 'ses', ...): a second delivery of the same id is a replay and changes nothing.
CREATE TABLE nudge.received (
    source      text        NOT NULL,
    id          text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, id)
);
CREATE INDEX received_at ON nudge.received (received_at);

-- Events, one array element each. ids may hold NULLs (nothing to de-duplicate
-- by); an id seen before for this source, or twice in the batch, is dropped.
-- Returns how many were stored and how many were replays.
CREATE FUNCTION nudge.ingest(
    source text, ids text[], user_ids text[], events text[], occurred_at timestamptz[], props jsonb[]
) RETURNS TABLE (stored int, replayed int)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int := coalesce(cardinality(user_ids), 0);
    bad int;
BEGIN
    -- 'webhook:…' is record_webhook's: a writer must not mark a provider's report as seen
    IF source IS NULL OR source !~ '^[a-z0-9_-]{1,63}$' THEN
        RAISE EXCEPTION 'ingest: source % is not a name of lower-case letters, digits, _ and -', coalesce(quote_literal(source), 'NULL')
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(cardinality(ids), 0) <> n OR coalesce(cardinality(events), 0) <> n
       OR coalesce(cardinality(occurred_at), 0) <> n OR coalesce(cardinality(props), 0) <> n THEN
        RAISE EXCEPTION 'ingest: ids, user_ids, events, occurred_at and props must have one element per event'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(i.ord) INTO bad FROM unnest(ids, user_ids, events, occurred_at, props) WITH ORDINALITY
        AS i(id, user_id, event, at, p, ord)
     WHERE coalesce(i.user_id, '') = '' OR coalesce(i.event, '') = '' OR i.at IS NULL
        OR NOT i.at BETWEEN '1900-01-01' AND '9999-12-31' OR jsonb_typeof(i.p) IS DISTINCT FROM 'object'
        OR length(i.user_id) > 255 OR length(i.event) > 255 OR length(i.id) > 255;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ingest: event % (from 1) needs a user id, an event name, a time between 1900 and 9999 and props that are a JSON object', bad
              USING ERRCODE = 'invalid_parameter_value',
                    DETAIL = 'ids, user ids and event names have at most 255 characters';
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.*, row_number() OVER (PARTITION BY i.id ORDER BY i.ord) AS nth
          FROM unnest(ids, user_ids, events, occurred_at, props) WITH ORDINALITY AS i(id, user_id, event, at, p, ord)
    ), fresh AS (
        INSERT INTO nudge.received (source, id)
        SELECT ingest.source, i.id FROM input i WHERE i.id IS NOT NULL AND i.nth = 1
        ON CONFLICT DO NOTHING
        RETURNING id
    ), stored AS (
        INSERT INTO nudge.events (user_id, event, occurred_at, props)
        SELECT i.user_id, i.event, i.at, i.p FROM input i
         WHERE i.id IS NULL OR (i.nth = 1 AND i.id IN (SELECT f.id FROM fresh f))
         ORDER BY i.ord
        RETURNING 1
    )
    SELECT count(*)::int, n - count(*)::int FROM stored;
END
$$;

-- Profiles: email and timezone replace what is there when given; set_attrs
-- overwrite attributes, set_once_attrs fill only the ones not yet set.
CREATE FUNCTION nudge.identify(
    user_ids text[], emails text[], timezones text[], set_attrs jsonb[], set_once_attrs jsonb[]
) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int := coalesce(cardinality(user_ids), 0);
    bad int;
    zone text;
    parts jsonb;
    done int;
BEGIN
    IF coalesce(cardinality(emails), 0) <> n OR coalesce(cardinality(timezones), 0) <> n
       OR coalesce(cardinality(set_attrs), 0) <> n OR coalesce(cardinality(set_once_attrs), 0) <> n THEN
        RAISE EXCEPTION 'identify: user_ids, emails, timezones, set_attrs and set_once_attrs must have one element per profile'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(i.ord) INTO bad FROM unnest(user_ids, set_attrs, set_once_attrs) WITH ORDINALITY AS i(user_id, s, o, ord)
     WHERE coalesce(i.user_id, '') = '' OR jsonb_typeof(coalesce(i.s, '{}')) <> 'object'
        OR jsonb_typeof(coalesce(i.o, '{}')) <> 'object';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'identify: profile % (from 1) needs a user id, and attributes that are JSON objects', bad
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR zone IN SELECT DISTINCT z FROM unnest(timezones) z WHERE z IS NOT NULL LOOP
        BEGIN
            PERFORM now() AT TIME ZONE zone;
        EXCEPTION WHEN invalid_parameter_value THEN
            RAISE EXCEPTION 'identify: % is not a time zone', quote_literal(zone)
                  USING ERRCODE = 'invalid_parameter_value', HINT = 'an IANA name such as Europe/Paris';
        END;
    END LOOP;
    -- A user's rows in the batch apply in order, as if they came one by one.
    -- One pass makes `parts`, user -> [set-once, set, email, time zone]; the
    -- upsert looks a conflicting user up in it (a binary search, where a
    -- lookup into a CTE would scan it for every row).
    WITH input AS (
        SELECT i.* FROM unnest(user_ids, emails, timezones, set_attrs, set_once_attrs) WITH ORDINALITY
               AS i(user_id, email, zone, s, o, ord)
    ), kv AS (
        SELECT i.user_id, 's' AS part, e.key, e.value, i.ord FROM input i, jsonb_each(coalesce(i.s, '{}')) e
        UNION ALL
        -- set-once: the first value given wins, so it is aggregated last
        SELECT i.user_id, 'o', e.key, e.value, -i.ord FROM input i, jsonb_each(coalesce(i.o, '{}')) e
    ), merged AS (
        SELECT kv.user_id,
               jsonb_object_agg(kv.key, kv.value ORDER BY kv.ord) FILTER (WHERE kv.part = 'o') AS o,
               jsonb_object_agg(kv.key, kv.value ORDER BY kv.ord) FILTER (WHERE kv.part = 's') AS s
          FROM kv GROUP BY kv.user_id
    ), per_user AS (
        SELECT i.user_id,
               (array_agg(nullif(btrim(i.email), '') ORDER BY i.ord DESC)
                    FILTER (WHERE nullif(btrim(i.email), '') IS NOT NULL))[1] AS email,
               (array_agg(i.zone ORDER BY i.ord DESC) FILTER (WHERE i.zone IS NOT NULL))[1] AS zone
          FROM input i GROUP BY i.user_id
    )
    SELECT jsonb_object_agg(u.user_id, jsonb_build_array(coalesce(m.o, '{}'), coalesce(m.s, '{}'), u.email, u.zone))
      INTO parts
      FROM per_user u LEFT JOIN merged m ON m.user_id = u.user_id;
    INSERT INTO nudge.profiles AS p (user_id, email, timezone, attrs)
    SELECT e.key, e.value->>2, e.value->>3, (e.value->0) || (e.value->1) FROM jsonb_each(parts) e
    ON CONFLICT (user_id) DO UPDATE
       SET email = coalesce(EXCLUDED.email, p.email),
           timezone = coalesce(EXCLUDED.timezone, p.timezone),
           attrs = (parts -> p.user_id -> 0) || p.attrs || (parts -> p.user_id -> 1);
    GET DIAGNOSTICS done = ROW_COUNT;
    RETURN done;
END
$$;

-- A provider's report of what happened to a message. A report id seen before
-- for this provider is a replay (providers deliver at least once); a report
-- about a message that is not ours (the account sends other mail too) is
-- ignored. A nonce (a value the provider signs once per request, Mailgun's
-- token) seen before makes the report a replay whatever its id. Returns
-- 'recorded', 'replayed' or 'unknown message'.
CREATE FUNCTION nudge.record_webhook(
    provider text, report_id text, message_key text, kind text, occurred_at timestamptz,
    meta jsonb DEFAULT '{}', nonce text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(btrim(provider), '') = '' OR coalesce(report_id, '') = '' THEN
        RAISE EXCEPTION 'record_webhook: provider and report_id must not be empty'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM nudge.outbox o WHERE o.message_key = record_webhook.message_key) THEN
        RETURN 'unknown message';
    END IF;
    IF nonce IS NOT NULL THEN
        INSERT INTO nudge.received (source, id) VALUES ('webhook-nonce:' || provider, nonce) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'replayed';
        END IF;
    END IF;
    INSERT INTO nudge.received (source, id) VALUES ('webhook:' || provider, report_id) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'replayed';
    END IF;
    PERFORM nudge.record_engagement(message_key, kind, coalesce(occurred_at, now()),
                                    coalesce(meta, '{}') || jsonb_build_object('provider', provider));
    RETURN 'recorded';
END
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

SELECT pg_catalog.pg_extension_config_dump('nudge.received', '');

REVOKE ALL ON nudge.received FROM PUBLIC;
GRANT SELECT ON nudge.received TO nudge_admin;
REVOKE ALL ON FUNCTION nudge.ingest(text, text[], text[], text[], timestamptz[], jsonb[]),
    nudge.identify(text[], text[], text[], jsonb[], jsonb[]),
    nudge.record_webhook(text, text, text, text, timestamptz, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.ingest(text, text[], text[], text[], timestamptz[], jsonb[]),
    nudge.identify(text[], text[], text[], jsonb[], jsonb[]) TO nudge_admin, nudge_writer;
GRANT EXECUTE ON FUNCTION nudge.record_webhook(text, text, text, text, timestamptz, jsonb, text),
    nudge.worker_status() TO nudge_mailer;

-- open and click tracking (nudge-gateway's GET /o/{token} and /c/{token})
CREATE FUNCTION nudge."follow"(
	"token" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'follow_wrapper';
CREATE FUNCTION nudge."opened"(
	"token" TEXT /* & str */
) RETURNS bool /* bool */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'opened_wrapper';
REVOKE ALL ON FUNCTION nudge.follow(text), nudge.opened(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.follow(text), nudge.opened(text) TO nudge_admin, nudge_mailer;
