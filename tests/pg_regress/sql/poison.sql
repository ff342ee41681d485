-- One bad message never stops the others, and a lookup that times out is
-- tried again later instead of failing the message for good; retention.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
RESET client_min_messages;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Hi {{ user_id }}', '<p>hi {{ context.flag.slow }}</p>');
SELECT nudge.define_trigger('ping', '{"expire_after": "never", "on": {"event": "ping"}, "template": "t"}');
INSERT INTO nudge.profiles (user_id, email)
SELECT 'u' || g, 'u' || g || '@example.com' FROM generate_series(1, 5) g;
INSERT INTO nudge.profiles (user_id, email) VALUES ('poison', 'poison@example.com');

-- the database refuses one message (a constraint stands in for any data it
-- cannot take): that enrollment is set aside with the error, the others go
ALTER TABLE nudge.outbox ADD CONSTRAINT no_poison CHECK (recipient <> 'poison@example.com');
SELECT nudge.track(u, 'ping', '{}', '2026-03-01 10:00')
  FROM unnest(ARRAY['u1', 'poison', 'u2']) u ORDER BY 1;
SELECT nudge.run_due('2026-03-01 10:01') AS written;
SELECT user_id, state, reason FROM nudge.enrollments ORDER BY user_id;
SELECT step, detail FROM nudge.explain('ping', 'poison') WHERE step = 'failed';
ALTER TABLE nudge.outbox DROP CONSTRAINT no_poison;
DELETE FROM nudge.enrollments;
DELETE FROM nudge.outbox;

-- a context query that times out: the enrollment waits and is tried again;
-- a slow user's timeout does not hold the others back
DROP TABLE IF EXISTS public.slow_users;
CREATE TABLE public.slow_users (user_id text);
INSERT INTO public.slow_users VALUES ('u3');
SELECT nudge.define_trigger('slow', '{"expire_after": "never", "on": {"event": "slow"}, "template": "t",
  "context": {"flag": "SELECT true AS slow, pg_sleep(CASE WHEN EXISTS (SELECT FROM public.slow_users s WHERE s.user_id = $1) THEN 0.5 ELSE 0 END)"}}');
SET nudge.user_sql_timeout = 100;
SET nudge.retry_base_seconds = 60;
SET nudge.max_attempts = 2;
SELECT nudge.track(u, 'slow', '{}', '2026-03-01 10:00') FROM unnest(ARRAY['u1', 'u3', 'u4']) u ORDER BY 1;
SELECT nudge.run_due('2026-03-01 10:01') AS written;
SELECT user_id, state, attempts, due_at > '2026-03-01 10:01:29' AND due_at <= '2026-03-01 10:02:01' AS backed_off,
       reason LIKE 'retrying at 2026-03-01 10:0_:__ UTC (attempt 1 failed): context.flag: canceling statement due to statement timeout' AS why
  FROM nudge.enrollments ORDER BY user_id;
SELECT step, detail LIKE '%statement timeout' AS timeout FROM nudge.explain('slow', 'u3') WHERE step = 'retry';
-- not due again before its time
SELECT nudge.run_due('2026-03-01 10:01:20') AS written;
-- u3 is fast again: it goes at its retry; u5, slow at both its attempts, fails with the count
UPDATE public.slow_users SET user_id = 'u5';
SELECT nudge.track('u5', 'slow', '{}', '2026-03-01 10:02');
SELECT nudge.run_due('2026-03-01 10:03') AS written;
SELECT nudge.run_due('2026-03-01 10:05') AS written;
SELECT user_id, state, attempts, reason LIKE 'message %' AS sent_reason,
       CASE WHEN state = 'failed' THEN reason END AS failure
  FROM nudge.enrollments ORDER BY user_id;
RESET nudge.user_sql_timeout;
RESET nudge.retry_base_seconds;
RESET nudge.max_attempts;

-- retention: what is older than nudge.retention and finished goes, in batches;
-- a user's latest journey of a trigger stays (reentry "once" reads it)
DELETE FROM nudge.enrollments;
DELETE FROM nudge.outbox;
DELETE FROM nudge.journal;
SELECT nudge.track('u1', 'ping', '{}', '2025-01-01 10:00'), nudge.track('u1', 'ping', '{}', '2025-01-02 10:00'),
       nudge.track('u2', 'ping', '{}', '2025-01-01 10:00');
SELECT nudge.run_due('2025-01-03') AS written;
SELECT nudge.track('u3', 'ping', '{}', now() + interval '1 day');
INSERT INTO nudge.journal (user_id, trigger, at, step, detail, recorded_at)
VALUES ('u1', 'ping', '2025-01-01', 'note', 'old', '2025-01-01'), ('u1', 'ping', now(), 'note', 'new', now());
UPDATE nudge.enrollments SET updated_at = '2025-01-03';
UPDATE nudge.outbox SET created_at = '2025-01-03', status = 'sent';
INSERT INTO nudge.capture_queue VALUES ('u9', 'ping', '2025-01-01', '{}', '2025-01-01');
INSERT INTO nudge.suppressions (email, user_id, reason, created_at) VALUES ('old@example.com', 'u8', 'unsubscribed', '2020-01-01');
SET nudge.retention = 'off';
SELECT * FROM nudge.apply_retention();
SET nudge.retention = 'a while';
SELECT * FROM nudge.apply_retention();
SET nudge.retention = '1 hour';
SELECT * FROM nudge.apply_retention();
SET nudge.retention = '30 days';
SELECT * FROM nudge.apply_retention(1);
SELECT * FROM nudge.apply_retention();
SELECT user_id, CASE WHEN entered_at < now() THEN entered_at END AS entered_at, state FROM nudge.enrollments ORDER BY user_id, entered_at;
SELECT count(*) AS outbox FROM nudge.outbox;
SELECT detail FROM nudge.journal ORDER BY id;
SELECT count(*) AS queued FROM nudge.capture_queue;
SELECT email FROM nudge.suppressions;
RESET nudge.retention;
-- only the worker or a superuser deletes history
SELECT has_function_privilege('nudge_admin', 'nudge.apply_retention(int)', 'EXECUTE') AS admin_may;
