-- nudge.backtest replays a definition over history without writing; over a
-- closed period it agrees with what the live trigger did on the same events.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SET max_parallel_workers_per_gather = 0;
SELECT setseed(0.5);
SELECT nudge.define_template('t', 'Your cart {{ event.cart }}', '<p>hi</p>');
INSERT INTO nudge.profiles (user_id, email, timezone, attrs)
SELECT 'u' || i, 'u' || i || '@example.com', (ARRAY['Europe/Berlin', 'America/New_York', NULL])[1 + i % 3],
       jsonb_build_object('country', (ARRAY['DE', 'US', 'FR', 'DE'])[1 + i % 4])
  FROM generate_series(1, 300) i;
SELECT nudge.define_trigger('cart', '{"expire_after": "never",
  "on": {"event": "cart_added", "key": "cart"}, "wait": "2 hours",
  "unless": [{"event": "purchased", "same_key": true}],
  "audience": {"country": {"in": ["DE", "US"]}},
  "reentry": {"cooldown": "1 day"},
  "cap": [{"max": 1, "per": "2 days"}],
  "quiet_hours": {"start": "22:00", "end": "07:00"},
  "template": "t"}');

-- ten days of carts and purchases, in one statement
INSERT INTO nudge.events (user_id, event, occurred_at, props)
SELECT 'u' || (1 + floor(random() * 300)::int),
       CASE WHEN random() < 0.7 THEN 'cart_added' ELSE 'purchased' END,
       '2026-04-01'::timestamptz + random() * interval '10 days',
       jsonb_build_object('cart', 'k' || floor(random() * 3)::int)
  FROM generate_series(1, 3000);

-- the live trigger, run once after the period
SELECT nudge.run_due('2026-04-11', 100000) > 0 AS wrote;

CREATE TEMP TABLE live AS
SELECT 'entered' AS outcome, count(*) AS n FROM nudge.enrollments
UNION ALL SELECT 'coalesced entries', sum(coalesced) FROM nudge.enrollments
UNION ALL SELECT 'exited', count(*) FROM nudge.enrollments WHERE state = 'exited'
UNION ALL SELECT 'waiting at the end', count(*) FROM nudge.enrollments WHERE state = 'waiting'
UNION ALL SELECT 'sent', count(*) FROM nudge.enrollments WHERE state = 'sent'
UNION ALL SELECT 'sent later (send schedule)', count(*) FROM nudge.enrollments WHERE reason LIKE '%by the send schedule%'
UNION ALL SELECT 'suppressed: ' || rule, count(*) FROM nudge.enrollments WHERE state = 'suppressed' GROUP BY rule
-- a journal line stands for the refusals of one statement: "(N entry events, ..."
UNION ALL SELECT 'not entered: ' || rule, sum(coalesce((regexp_match(detail, '\((\d+) entry events'))[1]::int, 1))
  FROM nudge.journal WHERE step = 'not entered' GROUP BY rule;

CREATE TEMP TABLE replayed AS
SELECT outcome, journeys AS n, sample_users
  FROM nudge.backtest((SELECT definition FROM nudge.trigger_versions WHERE trigger = 'cart'), '2026-04-01', '2026-04-11');

-- side by side: every outcome the same
SELECT l.outcome, l.n AS live, r.n AS backtest, l.n = r.n AS agree
  FROM live l FULL JOIN replayed r USING (outcome) ORDER BY 1;
SELECT bool_and(l.n = r.n) AND count(*) = (SELECT count(*) FROM live) AS all_agree, min(l.n) > 0 AS every_rule_fired
  FROM live l JOIN replayed r USING (outcome);
-- samples are real users of that outcome
SELECT bool_and(u IN (SELECT user_id FROM nudge.enrollments WHERE state = 'sent')) AS samples_are_real
  FROM replayed, unnest(sample_users) u WHERE outcome = 'sent';

-- nothing was written by the backtest
SELECT count(*) AS enrollments_after FROM nudge.enrollments;

-- a change tried before going live: a shorter wait, no cap
SELECT outcome, journeys FROM nudge.backtest('{
  "on": {"event": "cart_added", "key": "cart"}, "wait": "30 minutes",
  "unless": [{"event": "purchased", "same_key": true}], "template": "t"}', '2026-04-01', '2026-04-11')
 WHERE outcome IN ('entered', 'sent', 'exited') ORDER BY 1;

SELECT * FROM nudge.backtest('{"on": {"event": "x"}, "wait": "soon", "template": "t"}', '2026-04-01', '2026-04-11');

-- variants alone name the content; a holdout and arms are drawn in backtest
-- as the live trigger (given its name) draws them
SELECT nudge.define_template('tb', 'B', '<p>b</p>');
SELECT nudge.define_trigger('welcome_ab', '{"expire_after": "never", "on": {"event": "signed_up"},
  "variants": [{"name": "A", "template": "t"}, {"name": "B", "template": "tb"}], "holdout": 0.2}');
INSERT INTO nudge.profiles (user_id, email) SELECT 'w' || g, 'w' || g || '@example.com' FROM generate_series(1, 400) g;
INSERT INTO nudge.events (user_id, event, occurred_at) SELECT 'w' || g, 'signed_up', '2026-04-02 10:00+00' FROM generate_series(1, 400) g;
SELECT nudge.run_due('2026-04-03') > 0 AS wrote;
CREATE TEMP TABLE ab_live AS
SELECT CASE state WHEN 'held_out' THEN 'held out' ELSE state END AS outcome, count(*) AS n
  FROM nudge.enrollments WHERE trigger = 'welcome_ab' GROUP BY state;
CREATE TEMP TABLE ab_replayed AS
SELECT outcome, journeys AS n
  FROM nudge.backtest((SELECT definition FROM nudge.trigger_versions WHERE trigger = 'welcome_ab'), '2026-04-01', '2026-04-11', 'welcome_ab')
 WHERE outcome IN ('sent', 'held out');
SELECT l.outcome, l.n = r.n AS agree FROM ab_live l FULL JOIN ab_replayed r USING (outcome) ORDER BY 1;
-- per arm too: the live arms of the users the backtest sampled as held out
SELECT count(*) FILTER (WHERE e.variant IS DISTINCT FROM 'holdout') AS sampled_but_not_held_out
  FROM nudge.backtest((SELECT definition FROM nudge.trigger_versions WHERE trigger = 'welcome_ab'), '2026-04-01', '2026-04-11', 'welcome_ab') b,
       unnest(b.sample_users) u JOIN nudge.enrollments e ON e.user_id = u AND e.trigger = 'welcome_ab'
 WHERE b.outcome = 'held out';
-- without the name the arms are another experiment's, and it says so
SELECT count(*) > 0 AS ran FROM nudge.backtest((SELECT definition FROM nudge.trigger_versions WHERE trigger = 'welcome_ab'), '2026-04-01', '2026-04-11');
