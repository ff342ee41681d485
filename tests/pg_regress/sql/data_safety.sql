-- Never break the application's INSERT: same instants, date columns, big
-- one-transaction backfills, and times no journey can be scheduled from.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Thanks', '<p>thanks</p>');
SELECT nudge.define_trigger('thanks', '{"expire_after": "never", "on": {"event": "purchased"}, "wait": "1 hour", "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('c1', 'c1@example.com'), ('c4', 'c4@example.com');

-- a source whose time column is a date: two orders of one day share an instant
DROP TABLE IF EXISTS public.day_orders;
CREATE TABLE public.day_orders (customer text, day date, total numeric);
SELECT nudge.add_source('public.day_orders', 'customer', time_column => 'day', event_name => 'purchased');
INSERT INTO public.day_orders VALUES ('c1', '2026-03-01', 10);
SELECT nudge.run_due('2026-03-02') AS written;
-- the journey of that instant is over; the second order of the day is inserted all the same
INSERT INTO public.day_orders VALUES ('c1', '2026-03-01', 20);
INSERT INTO public.day_orders VALUES ('c2', '2026-03-01', 1), ('c2', '2026-03-01', 2), ('c2', NULL, 3), (NULL, '2026-03-01', 4);
SELECT count(*) AS orders FROM public.day_orders;
SELECT user_id, state, coalesced FROM nudge.enrollments ORDER BY user_id, id;

-- a backfill of 20,000 users in one transaction holds a bounded number of locks
BEGIN;
SELECT count(nudge.track('b' || g, 'purchased', '{}', '2026-03-01 10:00')) AS tracked FROM generate_series(1, 20000) g;
SELECT count(*) <= 257 AS bounded_locks FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS journeys FROM nudge.enrollments WHERE user_id LIKE 'b%';

-- infinite and far-off times: refused by track with 22008, left out by capture
DO $$ BEGIN
    PERFORM nudge.track('c3', 'purchased', '{}', '-infinity');
EXCEPTION WHEN OTHERS THEN RAISE NOTICE '% %', SQLSTATE, SQLERRM;
END $$;
DO $$ BEGIN
    PERFORM nudge.track('c3', 'purchased', '[1]');
EXCEPTION WHEN OTHERS THEN RAISE NOTICE '% %', SQLSTATE, SQLERRM;
END $$;
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES
    ('c3', 'purchased', '-infinity'), ('c3', 'purchased', 'infinity'), ('c3', 'purchased', '200000-01-01'),
    ('c4', 'purchased', '2026-03-01 10:00');
SELECT count(*) AS journeys_of_c3 FROM nudge.enrollments WHERE user_id = 'c3';
-- and the engine goes on for everyone
SELECT nudge.run_due('2026-03-05', 100000) > 0 AS wrote;
SELECT count(*) AS c4_messages FROM nudge.outbox WHERE user_id = 'c4';

-- a mapped column is neither renamed nor dropped from under capture; its
-- type may change (nothing of ours depends on it)
ALTER TABLE public.day_orders RENAME COLUMN customer TO buyer;
ALTER TABLE public.day_orders DROP COLUMN day;
ALTER TABLE public.day_orders ALTER COLUMN day TYPE timestamptz;
ALTER TABLE public.day_orders RENAME COLUMN total TO amount;
INSERT INTO public.day_orders VALUES ('c5', '2026-03-02 09:30', 5);
SELECT user_id, entered_at FROM nudge.enrollments WHERE user_id = 'c5';

-- dropping a source, its schema or its owner's objects drops nothing of ours
DROP SCHEMA IF EXISTS app CASCADE;
CREATE SCHEMA app;
CREATE TABLE app.signups (account text, at timestamptz);
SELECT nudge.add_source('app.signups', 'account', time_column => 'at', event_name => 'signed_up');
DROP TABLE public.day_orders;
DROP SCHEMA app CASCADE;
SELECT count(*) AS sources FROM nudge.sources;
SELECT count(*) AS journeys_kept FROM nudge.enrollments;
SELECT count(*) AS events_readable FROM nudge.all_events;

-- numbers beyond a double in props are kept as written, by track and by
-- capture, read back by every reader, and shown by a template
SELECT nudge.define_template('big', 'Total {{ event.total }} of {{ event.n }}', '<p>{{ event.total }}</p>');
SELECT nudge.define_trigger('big', '{"expire_after": "never", "on": {"event": "counted"}, "template": "big"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('n1', 'n1@example.com'), ('n2', 'n2@example.com');
SELECT nudge.track('n1', 'counted', '{"total": 1e400, "n": 12345678901234567890123}', '2026-03-01 10:00') IS NOT NULL AS tracked;
CREATE TABLE public.tallies (who text, at timestamptz, body jsonb);
SELECT nudge.add_source('public.tallies', 'who', time_column => 'at', props_column => 'body', event_name => 'counted');
INSERT INTO public.tallies VALUES ('n2', '2026-03-01 10:00', '{"total": -2e400, "n": 1}');
SELECT user_id, regexp_replace(props::text, '0{20,}', '0…0') AS props FROM nudge.all_events WHERE event = 'counted' ORDER BY user_id;
SELECT nudge.run_due('2026-03-01 10:01') AS written;
SELECT user_id, regexp_replace(subject, '0{20,}', '0…0') AS subject FROM nudge.outbox WHERE trigger = 'big' ORDER BY user_id;
DROP TABLE public.tallies;
