-- Measuring what messages do: variants, holdout, goal attribution, trigger_stats.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('cart_a', 'A: your cart', '<p>a</p>');
SELECT nudge.define_template('cart_b', 'B: still there?', '<p>b</p>');
SELECT nudge.define_trigger('cart', '{
  "on": {"event": "cart_added"}, "wait": "1 hour",
  "variants": [{"name": "A", "template": "cart_a"}, {"name": "B", "template": "cart_b", "weight": 1}],
  "holdout": 0.25,
  "goal": {"event": "purchased", "within": "7 days", "value": "total"},
  "template": "cart_a"}');
INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 40) i;
SELECT count(nudge.track('u' || i, 'cart_added', '{}', '2026-03-02 10:00+00')) FROM generate_series(1, 40) i;
SELECT nudge.run_due('2026-03-02 12:00+00') AS written;

-- every user keeps the arm drawn at entry; the holdout went through every rule and got nothing
SELECT coalesce(variant, '-') AS arm, state, count(*) FROM nudge.enrollments GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS holdout_users_in_outbox FROM nudge.outbox o
  JOIN nudge.enrollments e ON e.message_key = o.message_key WHERE e.variant = 'holdout';
SELECT variant, subject, count(*) FROM nudge.outbox GROUP BY 1, 2 ORDER BY 1;
SELECT bool_and(o.variant = e.variant) AS outbox_arm_is_enrollment_arm
  FROM nudge.outbox o JOIN nudge.enrollments e ON e.message_key = o.message_key;
SELECT step, detail FROM nudge.explain('cart', (SELECT user_id FROM nudge.enrollments WHERE variant = 'holdout' ORDER BY id LIMIT 1));

-- purchases: within 7 days of the send they convert; later ones do not
SELECT count(nudge.track(user_id, 'purchased', jsonb_build_object('total', 50), '2026-03-04 10:00+00'))
  FROM (SELECT user_id FROM nudge.enrollments WHERE variant = 'A' ORDER BY id LIMIT 5) a;
SELECT count(nudge.track(user_id, 'purchased', jsonb_build_object('total', 20), '2026-03-05 10:00+00'))
  FROM (SELECT user_id FROM nudge.enrollments WHERE variant = 'holdout' ORDER BY id LIMIT 2) h;
SELECT count(nudge.track(user_id, 'purchased', jsonb_build_object('total', 999), '2026-03-20 10:00+00'))
  FROM (SELECT user_id FROM nudge.enrollments WHERE variant = 'B' ORDER BY id LIMIT 3) b;
-- a user sent twice: the purchase counts once, for the latest send
SELECT u AS twice FROM (SELECT user_id AS u FROM nudge.enrollments WHERE variant = 'A' ORDER BY id LIMIT 1) x \gset
SELECT nudge.track(:'twice', 'cart_added', '{}', '2026-03-03 10:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-03-03 12:00+00') AS written;

SELECT trigger, arm, entered, held_out, sent, converted, round(conversion_rate::numeric, 4) AS rate, revenue,
       round(uplift::numeric, 4) AS uplift, round(uplift_ci_low::numeric, 4) AS ci_low,
       round(uplift_ci_high::numeric, 4) AS ci_high, round(p_value::numeric, 4) AS p
  FROM nudge.trigger_stats ORDER BY arm;
-- the twice-sent user: two exposures, one conversion on the later one
SELECT e.entered_at, e.state, s.converted
  FROM nudge.enrollments e,
       LATERAL (SELECT count(*) AS converted FROM nudge.all_events ev
                 WHERE ev.user_id = e.user_id AND ev.event = 'purchased'
                   AND ev.occurred_at >= e.sent_at AND ev.occurred_at <= e.sent_at + interval '7 days'
                   AND NOT EXISTS (SELECT 1 FROM nudge.enrollments l WHERE l.user_id = e.user_id AND l.sent_at > e.sent_at
                                     AND l.sent_at <= ev.occurred_at)) s
 WHERE e.user_id = :'twice' ORDER BY e.entered_at;
-- the A/B question: B against A (A converted 5 of its sends in the window, B none)
SELECT trigger, arm, against, sent, converted, against_sent, against_converted,
       round(uplift::numeric, 4) AS uplift, round(p_value::numeric, 4) AS p,
       uplift_ci_low < uplift AND uplift < uplift_ci_high AS interval_holds_it
  FROM nudge.compare_arms();
-- a period: only the journeys that entered in it
SELECT arm, entered FROM nudge.trigger_stats('2026-03-03', '2026-03-04') ORDER BY arm;

-- the interval and p-value of a hand-computed example (see core/src/experiment.rs)
SELECT round(uplift::numeric, 4) AS uplift, round(ci_low::numeric, 4) AS ci_low, round(ci_high::numeric, 4) AS ci_high,
       round(p_value::numeric, 5) AS p FROM nudge._uplift(120, 1000, 80, 1000);

-- mistakes
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "cart_a", "variants": [{"name": "A", "template": "nope"}]}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "cart_a", "holdout": 1}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "cart_a", "goal": {"event": "purchased"}}');

-- automatic winner: once each variant has 20 messages and one is clicked
-- significantly more, new entries go to it; the change is recorded
SELECT nudge.define_template('opt_x', 'X', '<p>x</p>');
SELECT nudge.define_template('opt_y', 'Y', '<p>y</p>');
SELECT nudge.define_trigger('opt', '{
  "on": {"event": "visited"}, "wait": "1 hour",
  "variants": [{"name": "X", "template": "opt_x"}, {"name": "Y", "template": "opt_y"}],
  "optimize": {"metric": "clicked", "min_per_arm": 20},
  "template": "opt_x"}');
INSERT INTO nudge.profiles (user_id, email) SELECT 'v' || i, 'v' || i || '@example.com' FROM generate_series(1, 120) i;
SELECT count(nudge.track('v' || i, 'visited', '{}', '2026-03-10 10:00+00')) FROM generate_series(1, 60) i;
SELECT nudge.run_due('2026-03-10 12:00+00') AS written;
-- not enough evidence yet: no clicks at all
SELECT * FROM nudge.evaluate_experiments();
-- most of X's messages are clicked, few of Y's
SELECT count(nudge.record_engagement(o.message_key, 'clicked'))
  FROM nudge.outbox o WHERE o.trigger = 'opt' AND (o.variant = 'X' OR o.id % 7 = 0);
SELECT arm, sent, clicked FROM nudge.trigger_stats WHERE trigger = 'opt' ORDER BY arm;
SELECT * FROM nudge.evaluate_experiments();
SELECT trigger, experiment, winner, evidence->'metric' AS metric FROM nudge.allocations;
SELECT * FROM nudge.evaluate_experiments();
-- from now on, every new entry goes to X
SELECT count(nudge.track('v' || i, 'visited', '{}', '2026-03-11 10:00+00')) FROM generate_series(61, 120) i;
SELECT variant, count(*) FROM nudge.enrollments WHERE trigger = 'opt' AND entered_at = '2026-03-11 10:00+00' GROUP BY 1;
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "cart_a", "optimize": {"metric": "converted", "min_per_arm": 5}}');
