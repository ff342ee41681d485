-- DUE cart adds (and a tenth more), all older than their 30-minute wait,
-- spread over every user; every eleventh cart was bought 10 minutes after it
-- was added (its journey exits at capture), and one customer in ten has not
-- opted in (the audience rule turns them away).
\set ON_ERROR_STOP on
SELECT nudge.define_trigger('eval_cart', '{
  "on": {"event": "cart_added", "key": "cart_id"}, "wait": "30 minutes",
  "unless": [{"event": "purchased", "same_key": true}],
  "audience": {"opted_in": {"eq": true}}, "template": "cart"}');
BEGIN;
INSERT INTO bench.events (user_id, event, occurred_at, props)
SELECT 'u' || (1 + i % 100000), 'cart_added', now() - interval '2 hours' + i * interval '10 microseconds',
       jsonb_build_object('cart_id', 'e' || i, 'product_id', i % 500, 'price', 19.99)
  FROM generate_series(1, :due + :due / 10) i;
INSERT INTO bench.events (user_id, event, occurred_at, props)
SELECT 'u' || (1 + i % 100000), 'purchased', now() - interval '110 minutes' + i * interval '10 microseconds',
       jsonb_build_object('cart_id', 'e' || i, 'total', 19.99)
  FROM generate_series(11, :due + :due / 10, 11) i;
COMMIT;
-- what autovacuum does within a minute of such a load; without statistics the
-- planner takes the just-filled tables for empty (docs/operations.md, "Limits of this version")
ANALYZE bench.events;
ANALYZE nudge.enrollments;
