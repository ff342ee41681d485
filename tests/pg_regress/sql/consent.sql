-- The edge of consent: one-click unsubscribe (RFC 8058), topics, erasure.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
RESET client_min_messages;
SET timezone = 'UTC';
SELECT nudge.configure('{"unsubscribe_url": "https://mail.shop.example", "unsubscribe_mailto": "unsubscribe@shop.example"}') IS NOT NULL AS configured;
SELECT nudge.define_template('news', 'News', '<p>news</p><a href="{{ unsubscribe_url }}">unsubscribe</a>');
SELECT nudge.define_template('receipt', 'Receipt', '<p>paid</p>');
SELECT nudge.define_trigger('digest', '{"on": {"event": "read"}, "topic": "newsletter", "reentry": "every_time", "template": "news"}');
SELECT nudge.define_trigger('promo', '{"on": {"event": "browsed"}, "reentry": "every_time", "template": "news"}');
SELECT nudge.define_trigger('paid', '{"on": {"event": "paid"}, "transactional": true, "reentry": "every_time", "template": "receipt"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('ann', 'Ann@Example.com'), ('bob', 'bob@example.com');
SELECT count(nudge.track(u, e, '{}', '2026-06-01 10:00+00'))
  FROM unnest(ARRAY['ann', 'bob']) u, unnest(ARRAY['read', 'browsed', 'paid']) e;
SELECT nudge.run_due('2026-06-01 10:05+00') AS written;

-- every message with a topic carries the headers; the receipt none
SELECT trigger, topic, headers ? 'List-Unsubscribe' AS list_unsubscribe,
       headers->>'List-Unsubscribe-Post' AS post,
       headers->>'List-Unsubscribe' ~ '^<https://mail\.shop\.example/u/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+>, <mailto:unsubscribe@shop\.example\?subject=unsubscribe%20' AS well_formed,
       html LIKE '%href="https://mail.shop.example/u/%' AS link_in_html
  FROM nudge.outbox WHERE user_id = 'ann' ORDER BY trigger;
SELECT substring(headers->>'List-Unsubscribe' FROM '/u/([^>]+)>') AS token
  FROM nudge.outbox WHERE user_id = 'ann' AND trigger = 'digest' \gset

-- a forged or altered token is refused, and changes nothing
SELECT * FROM nudge.unsubscribe('bm1fMR91MR9uZXdzbGV0dGVy.AAAA');
SELECT * FROM nudge.unsubscribe(:'token' || 'x');
SELECT count(*) AS consent_rows FROM nudge.subscriptions;
-- the real one: once, then a repeat that records nothing more
SELECT * FROM nudge.unsubscribe(:'token');
SELECT * FROM nudge.unsubscribe(:'token');
SELECT user_id, topic, status, source FROM nudge.subscriptions;
SELECT event, props->>'topic' AS topic, props->>'source' AS source FROM nudge.events WHERE event = 'email_unsubscribed';
SELECT unsubscribed_at IS NOT NULL AS marked FROM nudge.outbox WHERE user_id = 'ann' AND trigger = 'digest';

-- checked again at claim: a newsletter written while ann had subscribed
-- again, then withdrawn before a mailer took it, is cancelled
SELECT nudge.track('ann', 'read', '{}', '2026-06-01 11:00+00') > 0 AS tracked;
UPDATE nudge.outbox SET status = 'sent' WHERE status = 'pending';
SELECT nudge.subscribe('ann', 'newsletter');
SELECT nudge.run_due('2026-06-01 11:05+00') AS written;
SELECT nudge.unsubscribe('ann', 'newsletter', 'preferences page');
SELECT count(*) AS claimed FROM nudge.claim(10);
SELECT trigger, status, rule, last_error FROM nudge.outbox WHERE status = 'cancelled';
-- and at send time: the next newsletter is not written, marketing and receipts still go
SELECT count(nudge.track('ann', e, '{}', '2026-06-01 12:00+00')) FROM unnest(ARRAY['read', 'browsed', 'paid']) e;
SELECT nudge.run_due('2026-06-01 12:05+00') AS written;
SELECT trigger, state, rule, reason FROM nudge.enrollments
 WHERE user_id = 'ann' AND entered_at = '2026-06-01 12:00+00' ORDER BY trigger;
SELECT step, rule FROM nudge.explain('digest', 'ann') WHERE step = 'suppressed';
-- unsubscribed from all: no marketing at all, receipts still
SELECT nudge.unsubscribe('ann', 'all');
SELECT count(nudge.track('ann', e, '{}', '2026-06-01 13:00+00')) FROM unnest(ARRAY['browsed', 'paid']) e;
SELECT nudge.run_due('2026-06-01 13:05+00') AS written;
SELECT trigger, state, rule, reason FROM nudge.enrollments
 WHERE user_id = 'ann' AND entered_at = '2026-06-01 13:00+00' ORDER BY trigger;
-- bad input
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "topic": "all", "template": "news"}');
SELECT nudge.unsubscribe('', 'newsletter');
SELECT nudge.configure('{"unsubscribe_url": "mail.shop.example"}');

-- erasure: everything about bob goes, his address stays as a hash only
CREATE TABLE public.bob_orders (customer text, at timestamptz);
SELECT nudge.add_source('public.bob_orders', 'customer', time_column => 'at', event_name => 'ordered');
INSERT INTO public.bob_orders VALUES ('bob', '2026-06-01 09:00+00');
SELECT * FROM nudge.forget('bob');
-- nothing readable about him is left in our schema (every text, json and bytea column)
CREATE TEMP TABLE leftovers (tbl text, n bigint);
DO $$
DECLARE r record; n bigint;
BEGIN
    FOR r IN SELECT c.table_name, c.column_name FROM information_schema.columns c
              WHERE c.table_schema = 'nudge' AND c.data_type IN ('text', 'jsonb', 'json', 'ARRAY')
                AND c.table_name IN (SELECT tablename FROM pg_tables WHERE schemaname = 'nudge') LOOP
        EXECUTE format('SELECT count(*) FROM nudge.%I WHERE %I::text ILIKE %L OR %I::text ILIKE %L',
                       r.table_name, r.column_name, '%bob%', r.column_name, '%bob@example.com%') INTO n;
        IF n > 0 THEN INSERT INTO leftovers VALUES (r.table_name || '.' || r.column_name, n); END IF;
    END LOOP;
END $$;
SELECT * FROM leftovers;
-- his address, hashed, still stops mail to it under any user id
INSERT INTO nudge.profiles (user_id, email) VALUES ('bob2', ' BOB@example.com');
SELECT nudge.track('bob2', 'browsed', '{}', '2026-06-01 14:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-06-01 14:05+00') AS written;
SELECT state, rule, reason FROM nudge.enrollments WHERE user_id = 'bob2';
-- the application's own rows are untouched
SELECT count(*) AS bob_orders FROM public.bob_orders;
DROP TABLE public.bob_orders;
