-- The baselines a user would write by hand instead of pg_nudge.
\set ON_ERROR_STOP on
CREATE SEQUENCE bench.pings;

-- A minimal SKIP LOCKED queue (pgmq's shape): claim = push the visibility
-- timeout, ack = DELETE. Same payload columns as nudge.outbox.
CREATE TABLE bench.queue (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vt        timestamptz NOT NULL DEFAULT now(),
    read_ct   int NOT NULL DEFAULT 0,
    user_id   text NOT NULL,
    recipient text NOT NULL,
    subject   text NOT NULL,
    html      text NOT NULL,
    text_body text,
    headers   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ON bench.queue (vt);

-- The evaluation baseline's target: the due messages, unrendered.
CREATE TABLE bench.hand_outbox (
    user_id    text NOT NULL,
    cart_id    text NOT NULL,
    recipient  text NOT NULL,
    subject    text NOT NULL,
    html       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, cart_id)
);

-- Empties one system's queue and puts n identical-size messages in it.
CREATE FUNCTION bench.fill(system text, n int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    body text := repeat('<p>Your cart is waiting: a paragraph of a real email.</p>', 12);
BEGIN
    IF system = 'queue' THEN
        TRUNCATE bench.queue;
        INSERT INTO bench.queue (user_id, recipient, subject, html)
        SELECT 'u' || i % 100000, 'u' || i % 100000 || '@shop.example', 'Still thinking about it?', body
          FROM generate_series(1, n) i;
    ELSE
        -- claim hands out only messages of a trigger that exists (a dropped
        -- trigger's are cancelled): the rows belong to a real one
        IF NOT EXISTS (SELECT 1 FROM nudge.triggers WHERE name = 'bench') THEN
            PERFORM nudge.define_template('bench', 'Still thinking about it?', body);
            PERFORM nudge.define_trigger('bench', '{"on": {"event": "bench_outbox"}, "template": "bench"}');
        END IF;
        TRUNCATE nudge.outbox;
        INSERT INTO nudge.outbox (message_key, trigger, trigger_version, enrollment_id, user_id, recipient, subject, html, checked_at)
        SELECT md5(i::text), 'bench', 1, i, 'u' || i % 100000, 'u' || i % 100000 || '@shop.example',
               'Still thinking about it?', body, now()
          FROM generate_series(1, n) i;
    END IF;
END
$$;
