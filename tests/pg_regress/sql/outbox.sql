-- The outbox protocol: claim order, leases, ack, fail with backoff, dead letters, release.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Message for {{ user_id }}', '<p>hi</p>');
SELECT nudge.define_trigger('now', '{"on": {"event": "ping"}, "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 5) i;
SELECT count(nudge.track('u' || i, 'ping', '{}', now() - interval '1 minute')) FROM generate_series(1, 5) i;
SELECT nudge.run_due() AS written;
-- priority first, then the oldest
UPDATE nudge.outbox SET priority = 10 WHERE user_id = 'u4';
UPDATE nudge.outbox SET available_at = available_at - interval '1 hour' WHERE user_id = 'u2';

SELECT user_id, status, attempts, claimed_by FROM nudge.claim(2, '5 minutes', 'mailer-a') ORDER BY priority DESC, user_id;
-- claimed messages are not handed out twice
SELECT user_id, claimed_by FROM nudge.claim(10, '10 milliseconds', 'mailer-b') ORDER BY user_id;
SELECT count(*) AS claimable_now FROM nudge.claim(10);

-- a lease that runs out makes the message claimable again (mailer-b's were 10 ms)
SELECT pg_sleep(0.1);
SELECT user_id, attempts, claimed_by FROM nudge.claim(10, '5 minutes', 'mailer-c') ORDER BY user_id;

-- ack: once; again is a no-op; unknown or unclaimed ids are errors
SELECT nudge.ack(id, 'provider-1') FROM nudge.outbox WHERE user_id = 'u4';
SELECT nudge.ack(id, 'provider-1') FROM nudge.outbox WHERE user_id = 'u4';
SELECT status, provider_message_id, sent_at IS NOT NULL AS has_sent_at FROM nudge.outbox WHERE user_id = 'u4';
SELECT nudge.ack(-1);

-- fail: retried later with backoff (base 30 s, equal jitter: 15 to 30 s after the first attempt)
SET nudge.max_attempts = 2;
SELECT nudge.fail(id, 'smtp 451 try later') FROM nudge.outbox WHERE user_id = 'u2';
SELECT status, attempts, last_error,
       available_at - now() BETWEEN interval '15 seconds' AND interval '30 seconds' AS backoff_in_range
  FROM nudge.outbox WHERE user_id = 'u2';
-- (every other message is claimed or sent, so nothing is claimable until the backoff ends)
SELECT count(*) AS claimable_before_backoff FROM nudge.claim(10);
-- the second attempt fails too: that was the last one
UPDATE nudge.outbox SET available_at = now() - interval '1 second' WHERE user_id = 'u2';
SELECT user_id, attempts FROM nudge.claim(10, '5 minutes', 'mailer-d') WHERE user_id = 'u2';
SELECT nudge.fail(id, 'smtp 451 again') FROM nudge.outbox WHERE user_id = 'u2';
SELECT status, attempts, last_error FROM nudge.outbox WHERE user_id = 'u2';
-- a permanent failure is dead at once
SELECT nudge.fail(id, '550 no such user', permanent => true) FROM nudge.outbox WHERE user_id = 'u1';
SELECT status, attempts FROM nudge.outbox WHERE user_id = 'u1';
SELECT nudge.fail(id, 'again') FROM nudge.outbox WHERE user_id = 'u1';

-- release hands a claimed message back at once without counting the attempt
SELECT user_id, status, attempts FROM nudge.outbox WHERE status = 'claimed' ORDER BY user_id;
SELECT nudge.release(array_agg(id)) AS released FROM nudge.outbox WHERE status = 'claimed';
SELECT user_id, status, attempts, available_at <= now() AS available FROM nudge.outbox WHERE user_id IN ('u3', 'u5') ORDER BY user_id;

SELECT status, messages, oldest_age IS NOT NULL AS has_age FROM nudge.outbox_metrics();

-- ack_many: a claimed batch in one statement, with the provider's ids
SELECT user_id FROM nudge.claim(10, '5 minutes', 'mailer-e') ORDER BY user_id;
SELECT nudge.ack_many(array_agg(id ORDER BY user_id), array_agg('p-' || user_id ORDER BY user_id)) AS acked
  FROM nudge.outbox WHERE status = 'claimed';
SELECT user_id, status, provider_message_id FROM nudge.outbox WHERE user_id IN ('u3', 'u5') ORDER BY user_id;
-- again: nothing left to mark; an unknown id, or one not claimed, fails the whole call
SELECT nudge.ack_many(array_agg(id)) AS acked FROM nudge.outbox WHERE user_id IN ('u3', 'u5');
SELECT nudge.ack_many(ARRAY[-1]::bigint[]);
SELECT nudge.ack_many(array_agg(id)) FROM nudge.outbox WHERE user_id IN ('u1', 'u3');
SELECT user_id, status FROM nudge.outbox WHERE user_id IN ('u1', 'u3') ORDER BY user_id;
