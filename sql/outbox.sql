-- The outbox protocol, in SQL because each call is one set-based statement:
-- claim (SKIP LOCKED, leased), ack, fail (exponential backoff with jitter,
-- dead after nudge.max_attempts), metrics, and engagement feedback.
-- Mailer-facing functions are SECURITY DEFINER so that nudge_mailer needs
-- nothing but EXECUTE on them and SELECT on the outbox.

-- A setting of ours, or its default when the library is not loaded in this backend.
CREATE FUNCTION nudge._setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT coalesce(nullif(current_setting(name, true), ''), fallback) $$;

-- Claims up to `batch` messages, in priority order, leased for `lease`. The
-- statements are src/claim.rs's (docs/reference.md, "Claim"): there they run
-- on each shard group of a Citus node as well as on a single server. On a
-- Citus coordinator every node claims its share of the batch from its own
-- shards, each node in a transaction of its own (docs/citus.md).
CREATE FUNCTION nudge.claim(batch int DEFAULT 10, lease interval DEFAULT '5 minutes', consumer text DEFAULT NULL)
RETURNS SETOF nudge.outbox
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF nudge._placement() = 'coordinator' THEN
        -- each node's share of the batch; a node that fails is left out
        RETURN QUERY
            SELECT m.*
              FROM nudge._on_nodes(ARRAY(
                       SELECT format('SELECT coalesce(jsonb_agg(j), ''[]'') FROM nudge._claim_here(%s, %L, %L) j',
                                     share, coalesce(lease, interval '0'), consumer)
                         FROM unnest(nudge._node_shares(greatest(coalesce(batch, 0), 0))) share), false) r,
                   jsonb_populate_recordset(NULL::nudge.outbox, r::jsonb) m
             ORDER BY m.priority DESC, m.id;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT m.* FROM nudge._claim_here(coalesce(batch, 0), coalesce(lease, interval '0'), consumer) j,
                        jsonb_populate_record(NULL::nudge.outbox, j) m;
END
$$;

-- true when this call marked the message sent; false when it already was.
CREATE FUNCTION nudge.ack(id bigint, provider_message_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text;
BEGIN
    -- the update takes the row lock and re-reads the status after a
    -- concurrent ack; no FOR UPDATE, which Citus routes to one shard only
    UPDATE nudge.outbox o
       SET status = 'sent', sent_at = now(), provider_message_id = ack.provider_message_id, last_error = NULL
     WHERE o.id = ack.id AND o.status = 'claimed';
    IF FOUND THEN
        RETURN true;
    END IF;
    SELECT o.status INTO st FROM nudge.outbox o WHERE o.id = ack.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ack: no message with id %', ack.id;
    ELSIF st = 'sent' THEN
        RETURN false;
    END IF;
    RAISE EXCEPTION 'ack: message % is %, not claimed (claim it first)', ack.id, st;
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
    next_at timestamptz;
BEGIN
    -- read, then update only the row as it was read (no FOR UPDATE, which
    -- Citus routes to one shard only; the values are computed here, as
    -- Citus refuses now() and random() in an UPDATE of a distributed table);
    -- a concurrent change makes the update miss, and the row is read again
    LOOP
        SELECT o.status, o.attempts INTO m FROM nudge.outbox o WHERE o.id = fail.id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'fail: no message with id %', fail.id;
        ELSIF m.status <> 'claimed' THEN
            RAISE EXCEPTION 'fail: message % is %, not claimed', fail.id, m.status;
        END IF;
        IF permanent OR m.attempts >= max_attempts THEN
            UPDATE nudge.outbox o SET status = 'dead', last_error = fail.error
             WHERE o.id = fail.id AND o.status = 'claimed' AND o.attempts = m.attempts;
            IF FOUND THEN
                RETURN 'dead';
            END IF;
        ELSE
            -- exponential backoff, capped, with equal jitter: half fixed, half
            -- random, so that a burst of failures does not retry in lockstep
            delay := least(cap, base * 2 ^ (m.attempts - 1));
            delay := delay / 2 + random() * delay / 2;
            next_at := now() + delay * interval '1 second';
            UPDATE nudge.outbox o SET status = 'pending', last_error = fail.error, available_at = next_at
             WHERE o.id = fail.id AND o.status = 'claimed' AND o.attempts = m.attempts;
            IF FOUND THEN
                RETURN 'pending';
            END IF;
        END IF;
    END LOOP;
END
$$;

CREATE FUNCTION nudge.outbox_metrics()
RETURNS TABLE (status text, messages bigint, oldest_age interval)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- oldest_age: how long the oldest message in that status has existed;
    -- the outbox is aggregated first, which Citus does on every node
    SELECT s.status, coalesce(o.messages, 0), now() - o.oldest
      FROM unnest(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled']) WITH ORDINALITY AS s(status, place)
      LEFT JOIN (SELECT o.status, count(*) AS messages, min(o.created_at) AS oldest
                   FROM nudge.outbox o GROUP BY o.status) o ON o.status = s.status
     ORDER BY s.place
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    -- plpgsql, not sql: Citus does not plan a SQL function's parameters
    UPDATE nudge.outbox o
       SET status = 'pending', available_at = now(), attempts = greatest(o.attempts - 1, 0), claimed_by = NULL
     WHERE o.id = ANY (ids) AND o.status = 'claimed';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
