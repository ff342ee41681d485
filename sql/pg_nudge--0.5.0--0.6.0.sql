-- pg_nudge 0.5.0 -> 0.6.0: a decision is data (issue 12).
-- - enrollments.rule: the rule that ended a journey without its message
--   ('exit', 'expire_after', 'audience', 'audience_sql', 'suppression',
--   'abort', 'priority', 'cap', 'holdout', 'trigger_dropped', and for failures
--   'no_profile', 'no_email', 'profile_query', 'audience_sql_error',
--   'context', 'template', 'definition', 'error'; 'retry' while waiting for
--   another attempt). trigger_stats.suppressed_by and explain read it.
-- - outbox.rule uses the same names: 'suppressed' is now 'suppression',
--   'exited' is now 'exit'.
-- - journal.rule: the rule of a turned-away entry ('reentry', 'audience',
--   'audience_sql'), an exit ('exit'), a retry, a cancellation.
-- - explain returns the rule as a fourth column.
-- - nudge.compare_arms(): each variant against each other variant.
-- - Consent by topic (issue 13): nudge.subscriptions, nudge.subscribe /
--   nudge.unsubscribe(user_id, topic), outbox.topic, the definition key
--   "topic" (default "marketing"); run_due and claim check it. An unsubscribe
--   recorded by record_engagement withdraws consent (from meta's "topic", or
--   all) instead of suppressing the address, so receipts still go: 0.5.0's
--   suppressions for unsubscribes become consent rows.
-- - One-click unsubscribe: nudge.secrets (the key, made on first use),
--   nudge.unsubscribe(token), the List-Unsubscribe headers.
-- - Erasure: nudge.forget(user_id), nudge._address_hash.
-- - claim hands out a message only when its exit events were checked in the
--   last 5 minutes; run_due re-checks the held and the backlog.

ALTER TABLE nudge.enrollments ADD COLUMN rule text;
-- journeys decided by 0.5.0 get the rule their reason names
UPDATE nudge.enrollments SET rule = CASE
    WHEN state = 'exited' THEN 'exit'
    WHEN state = 'expired' THEN 'expire_after'
    WHEN state = 'held_out' THEN 'holdout'
    WHEN state = 'cancelled' THEN 'trigger_dropped'
    WHEN state = 'waiting' THEN CASE WHEN reason LIKE 'retrying at %' THEN 'retry' END
    WHEN state = 'suppressed' THEN CASE
        WHEN reason LIKE 'priority%' THEN 'priority'
        WHEN reason LIKE 'cap%' THEN 'cap'
        WHEN reason LIKE 'audience_sql%' THEN 'audience_sql'
        WHEN reason LIKE 'audience%' THEN 'audience'
        WHEN reason LIKE 'aborted by the template%' THEN 'abort'
        ELSE 'suppression' END
    WHEN state = 'failed' THEN CASE
        WHEN reason LIKE 'no profile%' THEN 'no_profile'
        WHEN reason LIKE 'profile of user % has no email%' THEN 'no_email'
        WHEN reason LIKE 'profile query%' THEN 'profile_query'
        WHEN reason LIKE 'audience_sql failed%' THEN 'audience_sql_error'
        WHEN reason LIKE 'context.%' THEN 'context'
        WHEN reason LIKE 'the trigger''s definition%' THEN 'definition'
        WHEN reason LIKE 'set aside%' THEN 'error'
        ELSE 'template' END
    END
 WHERE state <> 'sent';
ALTER TABLE nudge.journal ADD COLUMN rule text;
UPDATE nudge.journal SET rule = CASE
    WHEN step = 'exited' THEN 'exit'
    WHEN step = 'retry' THEN 'retry'
    WHEN step = 'cancelled' THEN 'trigger_dropped'
    WHEN detail LIKE 'reentry%' THEN 'reentry'
    WHEN detail LIKE 'audience_sql%' THEN 'audience_sql'
    WHEN detail LIKE 'audience%' THEN 'audience'
    END
 WHERE step IN ('exited', 'retry', 'cancelled', 'not entered');
UPDATE nudge.outbox SET rule = CASE rule WHEN 'suppressed' THEN 'suppression' WHEN 'exited' THEN 'exit' ELSE rule END
 WHERE rule IN ('suppressed', 'exited');

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
           AND (c.status = 'claimed' OR c.checked_at >= now() - interval '5 minutes')
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
                       CASE WHEN t.name IS NULL THEN 'trigger_dropped'
                            WHEN s.reason IS NOT NULL THEN 'suppression' ELSE 'consent' END AS rule,
                       CASE WHEN t.name IS NULL THEN 'trigger ' || c.trigger || ' was dropped'
                            WHEN s.reason IS NOT NULL THEN 'on the suppression list: ' || s.reason
                            ELSE u.why END AS why
                  FROM nudge.outbox c
                  LEFT JOIN nudge.triggers t ON t.name = c.trigger
                  LEFT JOIN LATERAL (SELECT s.reason FROM nudge.suppressions s
                                      WHERE s.email IN (lower(btrim(c.recipient)), nudge._address_hash(c.recipient))
                                         OR s.user_id = c.user_id
                                      LIMIT 1) s ON true
                  -- consent: a transactional message has no topic
                  LEFT JOIN LATERAL (SELECT CASE WHEN u.topic = 'all' THEN 'unsubscribed from all topics'
                                                 ELSE 'unsubscribed from topic ' || u.topic END AS why
                                       FROM nudge.subscriptions u
                                      WHERE u.user_id = c.user_id AND u.status = 'unsubscribed'
                                        AND u.topic IN (c.topic, 'all') AND NOT c.transactional
                                      ORDER BY u.topic = 'all' DESC
                                      LIMIT 1) u ON true
                 WHERE c.ctid = ANY (candidates)
                   AND (t.name IS NULL OR s.reason IS NOT NULL OR u.why IS NOT NULL)) x
         WHERE o.ctid = x.row_id
        RETURNING o.user_id, o.enrollment_id, o.rule, o.last_error)
    UPDATE nudge.enrollments e
       SET state = CASE WHEN x.rule = 'trigger_dropped' THEN 'cancelled' ELSE 'suppressed' END,
           rule = x.rule, reason = x.last_error || ' (found before the message went out)', updated_at = now()
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

-- a fourth column: the rule
DROP FUNCTION nudge.explain(text, text);
CREATE FUNCTION nudge.explain(trigger text, user_id text)
RETURNS TABLE (at timestamptz, step text, detail text, rule text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
BEGIN
    -- a misspelled name is an error, not an empty answer
    IF NOT EXISTS (SELECT 1 FROM nudge.trigger_versions v WHERE v.trigger = explain.trigger) THEN
        RAISE EXCEPTION 'explain: no trigger named "%"', explain.trigger
              USING ERRCODE = 'undefined_object',
                    HINT = 'nudge.triggers lists the triggers; a dropped one is still explained.';
    END IF;
    RETURN QUERY
    SELECT s.at, s.step, s.detail, s.rule FROM (
        SELECT e.entered_at AS at, 0 AS o, e.id, 'entered' AS step,
               'v' || e.trigger_version || CASE WHEN e.key <> '' THEN ' key ' || e.key ELSE '' END
               || ', due ' || to_char(e.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
               || coalesce(', arm ' || e.variant, '') AS detail,
               NULL::text AS rule
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id
        UNION ALL
        SELECT j.at, 1, j.id, j.step, j.detail, j.rule
          FROM nudge.journal j
         WHERE j.trigger = explain.trigger AND j.user_id = explain.user_id
        UNION ALL
        -- what run_due (or claim) decided: the enrollment's state, rule and
        -- reason; an exit at capture is the journal's line above
        SELECT CASE WHEN e.state = 'exited' THEN e.exited_at ELSE e.due_at END, 2, e.id, e.state, e.reason, e.rule
          FROM nudge.enrollments e
         WHERE e.trigger = explain.trigger AND e.user_id = explain.user_id
           AND (e.state IN ('sent', 'held_out', 'suppressed', 'failed', 'expired', 'cancelled')
                OR e.state = 'exited'
                   AND NOT EXISTS (SELECT 1 FROM nudge.journal j
                                    WHERE j.user_id = e.user_id AND j.enrollment_id = e.id AND j.step = 'exited'))) s
     ORDER BY s.at, s.o, s.id;
END
$$;
REVOKE ALL ON FUNCTION nudge.explain(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.explain(text, text) TO nudge_admin;

CREATE OR REPLACE FUNCTION nudge.trigger_stats(from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (
    trigger text, arm text,
    entered bigint, exited bigint, suppressed bigint, suppressed_by jsonb, failed bigint,
    held_out bigint, sent bigint, delivered bigint, opened bigint, clicked bigint,
    converted bigint, conversion_rate float8, revenue numeric,
    uplift float8, uplift_ci_low float8, uplift_ci_high float8, p_value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    WITH e AS (
        SELECT en.id, en.trigger, en.user_id, en.state, en.rule, en.message_key, en.sent_at,
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
                       coalesce(e.rule, 'unknown') AS rule,
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

CREATE FUNCTION nudge.compare_arms(from_ts timestamptz DEFAULT '-infinity', to_ts timestamptz DEFAULT 'infinity')
RETURNS TABLE (trigger text, arm text, against text, sent bigint, converted bigint,
               against_sent bigint, against_converted bigint,
               uplift float8, uplift_ci_low float8, uplift_ci_high float8, p_value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, nudge, pg_temp AS $$
    WITH s AS (SELECT * FROM nudge.trigger_stats(from_ts, to_ts) WHERE arm NOT IN ('holdout', 'default'))
    SELECT b.trigger, b.arm, a.arm, b.sent, b.converted, a.sent, a.converted,
           u.uplift, u.ci_low, u.ci_high, u.p_value
      FROM s a JOIN s b ON b.trigger = a.trigger AND b.arm > a.arm
      CROSS JOIN LATERAL nudge._uplift(b.converted, b.sent, a.converted, a.sent) u
     ORDER BY b.trigger, a.arm, b.arm
$$;
REVOKE ALL ON FUNCTION nudge.compare_arms(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.compare_arms(timestamptz, timestamptz) TO nudge_admin;

-- Consent by topic, one-click unsubscribe, erasure
CREATE TABLE nudge.subscriptions (
    user_id    text        NOT NULL,
    topic      text        NOT NULL,
    status     text        NOT NULL CHECK (status IN ('subscribed', 'unsubscribed')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    source     text        NOT NULL DEFAULT 'api',
    PRIMARY KEY (user_id, topic)
);
CREATE TABLE nudge.secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('nudge.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('nudge.secrets', '');
GRANT SELECT ON nudge.subscriptions TO nudge_admin;
ALTER TABLE nudge.outbox ADD COLUMN topic text;
-- what 0.5.0 wrote had the default topic
UPDATE nudge.outbox SET topic = 'marketing' WHERE NOT transactional;

CREATE FUNCTION nudge._address_hash(address text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'sha256:' || encode(sha256(convert_to(lower(btrim(address)), 'UTF8')), 'hex')
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

CREATE FUNCTION nudge.subscribe(user_id text, topic text DEFAULT 'marketing', source text DEFAULT 'api')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT nudge._set_subscription(subscribe.user_id, subscribe.topic, 'subscribed', subscribe.source)
$$;

CREATE FUNCTION nudge.unsubscribe(user_id text, topic text, source text DEFAULT 'api')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT nudge._set_subscription(unsubscribe.user_id, unsubscribe.topic, 'unsubscribed', unsubscribe.source)
$$;

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
    FOR relation IN SELECT s.source::text FROM nudge.sources s WHERE s.source <> 'nudge.events'::regclass ORDER BY 1 LOOP
        deleted := NULL;
        note := 'the application''s table: its rows for this user are not touched';
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION nudge."unsubscribe"(
	"token" TEXT /* & str */
) RETURNS TABLE (
	"user_id" TEXT,  /* String */
	"topic" TEXT,  /* String */
	"changed" bool  /* bool */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'unsubscribe_wrapper';

REVOKE ALL ON FUNCTION nudge._address_hash(text), nudge._set_subscription(text, text, text, text),
    nudge.subscribe(text, text, text), nudge.unsubscribe(text, text, text), nudge.forget(text),
    nudge.unsubscribe(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge._address_hash(text), nudge._set_subscription(text, text, text, text),
    nudge.subscribe(text, text, text), nudge.unsubscribe(text, text, text), nudge.forget(text),
    nudge.unsubscribe(text) TO nudge_admin;
GRANT EXECUTE ON FUNCTION nudge.subscribe(text, text, text), nudge.unsubscribe(text, text, text) TO nudge_writer;
GRANT EXECUTE ON FUNCTION nudge.unsubscribe(text) TO nudge_mailer;

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
           AND (c.status = 'claimed' OR c.checked_at >= now() - interval '5 minutes')
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
                       CASE WHEN t.name IS NULL THEN 'trigger_dropped'
                            WHEN s.reason IS NOT NULL THEN 'suppression' ELSE 'consent' END AS rule,
                       CASE WHEN t.name IS NULL THEN 'trigger ' || c.trigger || ' was dropped'
                            WHEN s.reason IS NOT NULL THEN 'on the suppression list: ' || s.reason
                            ELSE u.why END AS why
                  FROM nudge.outbox c
                  LEFT JOIN nudge.triggers t ON t.name = c.trigger
                  LEFT JOIN LATERAL (SELECT s.reason FROM nudge.suppressions s
                                      WHERE s.email IN (lower(btrim(c.recipient)), nudge._address_hash(c.recipient))
                                         OR s.user_id = c.user_id
                                      LIMIT 1) s ON true
                  -- consent: a transactional message has no topic
                  LEFT JOIN LATERAL (SELECT CASE WHEN u.topic = 'all' THEN 'unsubscribed from all topics'
                                                 ELSE 'unsubscribed from topic ' || u.topic END AS why
                                       FROM nudge.subscriptions u
                                      WHERE u.user_id = c.user_id AND u.status = 'unsubscribed'
                                        AND u.topic IN (c.topic, 'all') AND NOT c.transactional
                                      ORDER BY u.topic = 'all' DESC
                                      LIMIT 1) u ON true
                 WHERE c.ctid = ANY (candidates)
                   AND (t.name IS NULL OR s.reason IS NOT NULL OR u.why IS NOT NULL)) x
         WHERE o.ctid = x.row_id
        RETURNING o.user_id, o.enrollment_id, o.rule, o.last_error)
    UPDATE nudge.enrollments e
       SET state = CASE WHEN x.rule = 'trigger_dropped' THEN 'cancelled' ELSE 'suppressed' END,
           rule = x.rule, reason = x.last_error || ' (found before the message went out)', updated_at = now()
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

CREATE OR REPLACE FUNCTION nudge.record_engagement(
    message_key text, kind text, occurred_at timestamptz DEFAULT now(), meta jsonb DEFAULT '{}'
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m record;
BEGIN
    IF kind IS NULL OR kind NOT IN ('delivered', 'opened', 'clicked', 'bounced', 'complained', 'unsubscribed') THEN
        RAISE EXCEPTION 'record_engagement: unknown kind %', coalesce(quote_literal(kind), 'NULL')
            USING HINT = 'kind is one of delivered, opened, clicked, bounced, complained, unsubscribed';
    END IF;
    IF meta IS NOT NULL AND jsonb_typeof(meta) <> 'object' THEN
        RAISE EXCEPTION 'record_engagement: meta must be a JSON object';
    END IF;
    SELECT o.user_id, o.id, o.recipient, o.trigger, o.variant, o.topic INTO m
      FROM nudge.outbox o WHERE o.message_key = record_engagement.message_key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'record_engagement: no message with key %', coalesce(quote_literal(record_engagement.message_key), 'NULL');
    END IF;
    INSERT INTO nudge.events (user_id, event, occurred_at, props)
    VALUES (m.user_id, 'email_' || kind, record_engagement.occurred_at,
            coalesce(meta, '{}') || jsonb_build_object('message_key', record_engagement.message_key,
                                                      'trigger', m.trigger, 'variant', m.variant));
    UPDATE nudge.outbox o
       SET delivered_at    = CASE WHEN kind = 'delivered'    THEN coalesce(o.delivered_at, record_engagement.occurred_at)    ELSE o.delivered_at END,
           opened_at       = CASE WHEN kind = 'opened'       THEN coalesce(o.opened_at, record_engagement.occurred_at)       ELSE o.opened_at END,
           clicked_at      = CASE WHEN kind = 'clicked'      THEN coalesce(o.clicked_at, record_engagement.occurred_at)      ELSE o.clicked_at END,
           bounced_at      = CASE WHEN kind = 'bounced'      THEN coalesce(o.bounced_at, record_engagement.occurred_at)      ELSE o.bounced_at END,
           complained_at   = CASE WHEN kind = 'complained'   THEN coalesce(o.complained_at, record_engagement.occurred_at)   ELSE o.complained_at END,
           unsubscribed_at = CASE WHEN kind = 'unsubscribed' THEN coalesce(o.unsubscribed_at, record_engagement.occurred_at) ELSE o.unsubscribed_at END
     WHERE o.user_id = m.user_id AND o.id = m.id;
    -- a bounce is hard unless the provider says it is soft
    IF kind = 'unsubscribed' THEN
        PERFORM nudge._set_subscription(m.user_id, coalesce(meta->>'topic', 'all'), 'unsubscribed',
                                        coalesce(meta->>'source', 'engagement'));
    END IF;
    IF kind = 'complained' OR (kind = 'bounced' AND coalesce(meta->>'type', 'hard') <> 'soft') THEN
        INSERT INTO nudge.suppressions (email, user_id, reason, message_key)
        VALUES (lower(m.recipient), m.user_id, CASE kind WHEN 'bounced' THEN 'hard bounce' ELSE kind END,
                record_engagement.message_key)
        ON CONFLICT (email) DO NOTHING;
    END IF;
END
$$;

-- 0.5.0 suppressed an address for an unsubscribe; it is consent now
INSERT INTO nudge.subscriptions (user_id, topic, status, updated_at, source)
SELECT DISTINCT ON (s.user_id) s.user_id, 'all', 'unsubscribed', s.created_at, 'engagement'
  FROM nudge.suppressions s WHERE s.reason = 'unsubscribed' AND s.user_id <> ''
 ORDER BY s.user_id, s.created_at
ON CONFLICT DO NOTHING;
DELETE FROM nudge.suppressions s WHERE s.reason = 'unsubscribed' AND s.user_id <> '';
