-- The outbox protocol, in SQL because each call is one set-based statement:
-- claim (SKIP LOCKED, leased), ack, fail (exponential backoff with jitter,
-- dead after nudge.max_attempts), metrics, and engagement feedback.
-- Mailer-facing functions are SECURITY DEFINER so that nudge_mailer needs
-- nothing but EXECUTE on them and SELECT on the outbox.

-- A setting of ours, or its default when the library is not loaded in this backend.
CREATE FUNCTION nudge._setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT coalesce(nullif(current_setting(name, true), ''), fallback) $$;

-- The rows are picked by the index in priority order and updated by their
-- ctid (a TID scan): joined on the key instead, a generic plan (which cannot
-- know the batch size) hash-joined the whole outbox per claim. plpgsql, so
-- that the plan is kept for the session (a SQL function plans every call).
--
-- Right before a message is handed out, what can have changed since it was
-- written is looked at again (docs/reference.md, "Claim"): a suppressed
-- address or user cancels it (rule 'suppression'), so does a user who
-- unsubscribed from its topic ('consent'), a dropped trigger cancels
-- it ('trigger_dropped'), a paused trigger holds it. A message is claimable
-- only when its exit events were checked in the last 5 minutes: one held for
-- later (quiet hours, a retry) or waiting in a backlog is re-checked by
-- run_due. One whose lease ran out was checked when first claimed.
CREATE FUNCTION nudge.claim(batch int DEFAULT 10, lease interval DEFAULT '5 minutes', consumer text DEFAULT NULL)
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

-- true when this call marked the message sent; false when it already was.
CREATE FUNCTION nudge.ack(id bigint, provider_message_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text;
BEGIN
    SELECT o.status INTO st FROM nudge.outbox o WHERE o.id = ack.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ack: no message with id %', ack.id;
    ELSIF st = 'sent' THEN
        RETURN false;
    ELSIF st <> 'claimed' THEN
        RAISE EXCEPTION 'ack: message % is %, not claimed (claim it first)', ack.id, st;
    END IF;
    UPDATE nudge.outbox o
       SET status = 'sent', sent_at = now(), provider_message_id = ack.provider_message_id, last_error = NULL
     WHERE o.id = ack.id;
    RETURN true;
END
$$;

-- Acknowledges a batch in one statement (a consumer that sends a claimed
-- batch acks it at once). Returns how many this call marked sent; ids already
-- sent are skipped; an unknown or unclaimed id fails the whole call.
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

-- Returns the message's new status: 'pending' (retried at available_at) or 'dead'.
CREATE FUNCTION nudge.fail(id bigint, error text, permanent boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m record;
    base float8 := nudge._setting('nudge.retry_base_seconds', '30')::float8;
    cap float8 := nudge._setting('nudge.retry_max_seconds', '3600')::float8;
    max_attempts int := nudge._setting('nudge.max_attempts', '5')::int;
    delay float8;
BEGIN
    SELECT o.status, o.attempts INTO m FROM nudge.outbox o WHERE o.id = fail.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fail: no message with id %', fail.id;
    ELSIF m.status <> 'claimed' THEN
        RAISE EXCEPTION 'fail: message % is %, not claimed', fail.id, m.status;
    END IF;
    IF permanent OR m.attempts >= max_attempts THEN
        UPDATE nudge.outbox o SET status = 'dead', last_error = fail.error WHERE o.id = fail.id;
        RETURN 'dead';
    END IF;
    -- exponential backoff, capped, with equal jitter: half fixed, half random,
    -- so that a burst of failures does not retry in lockstep
    delay := least(cap, base * 2 ^ (m.attempts - 1));
    delay := delay / 2 + random() * delay / 2;
    UPDATE nudge.outbox o
       SET status = 'pending', last_error = fail.error, available_at = now() + delay * interval '1 second'
     WHERE o.id = fail.id;
    RETURN 'pending';
END
$$;

CREATE FUNCTION nudge.outbox_metrics()
RETURNS TABLE (status text, messages bigint, oldest_age interval)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- oldest_age: how long the oldest message in that status has existed
    SELECT s.status, count(o.id), now() - min(o.created_at)
      FROM unnest(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled']) AS s(status)
      LEFT JOIN nudge.outbox o ON o.status = s.status
     GROUP BY s.status
     ORDER BY array_position(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled'], s.status)
$$;

-- What happened to a message after it left: an event of its user
-- (email_delivered, email_opened, ...), usable by triggers; the first time of
-- each kind on the message; for a hard bounce or a complaint, a suppression
-- of the address (no mail at all); for an unsubscribe, the user's consent
-- withdrawn from meta's "topic", or from all topics (transactional mail still
-- goes).
CREATE FUNCTION nudge.record_engagement(
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

-- Hands claimed messages back at once (a mailer shutting down cleanly), as
-- if their lease had run out, without counting an attempt.
CREATE FUNCTION nudge.release(ids bigint[]) RETURNS int
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH r AS (
        UPDATE nudge.outbox o
           SET status = 'pending', available_at = now(), attempts = greatest(o.attempts - 1, 0), claimed_by = NULL
         WHERE o.id = ANY (ids) AND o.status = 'claimed'
        RETURNING 1)
    SELECT count(*)::int FROM r
$$;
