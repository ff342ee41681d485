-- A decision is data: every journey that ends without its message carries the
-- rule that ended it (enrollments.rule), trigger_stats and explain read that
-- column, and the reasons hold no ids, so GROUP BY over many users is one
-- row per rule.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
RESET client_min_messages;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Hi {{ profile.first_name }}', '<p>hi</p>');
SELECT nudge.define_template('quitter', 'Bye{% abort "not today" %}', '<p>-</p>');
SELECT nudge.configure('{"caps": [{"max": 1, "per": "1 day"}]}');
SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added"}, "wait": "1 hour",
  "unless": [{"event": "purchased"}], "audience": {"tier": {"ne": "blocked"}}, "priority": 5, "template": "t"}');
SELECT nudge.define_trigger('browse', '{"on": {"event": "viewed"}, "wait": "1 hour", "template": "t"}');
SELECT nudge.define_trigger('quit', '{"on": {"event": "quit"}, "wait": "1 hour", "template": "quitter"}');
INSERT INTO nudge.profiles (user_id, email, attrs)
SELECT 'u' || i, 'u' || i || '@example.com',
       jsonb_build_object('first_name', 'U' || i, 'tier', CASE WHEN i IN (3, 4) THEN 'blocked' ELSE 'ok' END)
  FROM generate_series(1, 12) i;
INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('u5@example.com', 'u5', 'hard bounce'), ('u6@example.com', 'u6', 'hard bounce');
-- u1, u2: exit at capture; u3, u4: audience; u5, u6: suppression list;
-- u7, u8: the cart wins, browse loses (priority) or is capped; u9: no profile row
SELECT count(nudge.track(u, 'cart_added', '{}', '2026-05-01 10:00+00')) FROM unnest(ARRAY['u1','u2','u3','u4','u5','u6','u7','u8','u99']) u;
SELECT count(nudge.track(u, 'purchased', '{}', '2026-05-01 10:30+00')) FROM unnest(ARRAY['u1','u2']) u;
SELECT count(nudge.track(u, 'viewed', '{}', '2026-05-01 10:00+00')) FROM unnest(ARRAY['u7','u8']) u;
SELECT count(nudge.track(u, 'quit', '{}', '2026-05-01 10:00+00')) FROM unnest(ARRAY['u10','u11']) u;
SELECT * FROM nudge.run_due_report('2026-05-01 12:00+00');
-- u8 again the same day: the global cap (1 a day) holds it
SELECT nudge.track('u8', 'viewed', '{}', '2026-05-01 13:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-05-01 15:00+00') AS written;

SELECT trigger, state, rule, count(*), min(reason) AS reason
  FROM nudge.enrollments GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
-- no reason names a user, an address or a message
SELECT count(*) AS reasons_with_ids FROM nudge.enrollments
 WHERE state <> 'sent' AND (reason ~ 'u[0-9]' OR reason ~ 'nm_');
SELECT trigger, arm, suppressed, suppressed_by, failed FROM nudge.trigger_stats ORDER BY 1, 2;
SELECT step, detail, rule FROM nudge.explain('cart', 'u1') WHERE step <> 'entered';
SELECT step, detail, rule FROM nudge.explain('cart', 'u3') WHERE step <> 'entered';
SELECT step, detail, rule FROM nudge.explain('browse', 'u8') WHERE step NOT IN ('entered', 'sent') ORDER BY at;
SELECT step, rule FROM nudge.explain('browse', 'u7') WHERE step <> 'entered';

-- an exit found at send time (loaded past capture) is explained once, from the journey
SELECT nudge.track('u12', 'cart_added', '{}', '2026-05-02 10:00+00') > 0 AS tracked;
ALTER TABLE nudge.events DISABLE TRIGGER USER;
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('u12', 'purchased', '2026-05-02 10:20+00');
ALTER TABLE nudge.events ENABLE TRIGGER USER;
SELECT nudge.run_due('2026-05-02 12:00+00') AS written;
SELECT step, detail, rule FROM nudge.explain('cart', 'u12') WHERE step <> 'entered';

-- a trigger on a misspelled event is accepted with a warning that names the likely one
SELECT nudge.define_trigger('typo', '{"on": {"event": "cart_addded"}, "unless": [{"event": "purchased"}], "template": "t"}');
SELECT nudge.drop_trigger('typo');

-- preview runs the same checks: a suppressed user gets no preview, with the rule
SELECT nudge.preview('browse', 'u5');
SELECT nudge.preview('cart', 'u3');
SELECT subject FROM nudge.preview('cart', 'u7');
-- the profile query's $1 is text: the error says so
CREATE TABLE public.members (id int, mail text);
SELECT nudge.set_profile_query('SELECT mail AS email FROM public.members WHERE id = $1');

-- a backfill mails nobody about the past: without expire_after a message
-- decided more than a day late expires; a transactional one still goes
SELECT nudge.define_trigger('stale', '{"on": {"event": "old_news"}, "template": "t"}');
SELECT nudge.define_trigger('receipt', '{"on": {"event": "old_news"}, "transactional": true, "template": "t"}');
SELECT nudge.track('u7', 'old_news', '{}', '2026-05-10 10:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-05-12 12:00+00') AS written;
SELECT trigger, state, rule, reason FROM nudge.enrollments WHERE trigger IN ('stale', 'receipt') ORDER BY trigger;

-- a paused trigger's journey, more important and due soon, does not take
-- the message of an active one: it goes nowhere until resumed
SELECT nudge.define_trigger('hi', '{"on": {"event": "ping"}, "wait": "10 minutes", "priority": 9, "template": "t"}');
SELECT nudge.define_trigger('lo', '{"on": {"event": "ping"}, "priority": 1, "template": "t"}');
SELECT nudge.track('u9', 'ping', '{}', '2026-05-20 10:00+00') > 0 AS tracked;
SELECT nudge.pause_trigger('hi');
SELECT nudge.run_due('2026-05-20 10:01+00') AS written;
SELECT trigger, state, rule FROM nudge.enrollments WHERE user_id = 'u9' AND trigger IN ('hi', 'lo') ORDER BY trigger;
