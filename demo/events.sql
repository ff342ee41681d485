-- Three days of the shop's browsing, carts, checkouts and orders, loaded
-- after the triggers exist, as a live shop would produce them.
\set ON_ERROR_STOP on
SET max_parallel_workers_per_gather = 0;
SELECT setseed(0.43);
-- one transaction, as if the shop had been live: the worker sees it all at once
BEGIN;

-- Sessions: most customers visit 1 to 3 times in the past three days.
CREATE TEMP TABLE sessions AS
SELECT c.id AS customer_id, s AS n,
       now() - (random() * interval '72 hours') AS started,
       1 + floor(random() * 40)::int AS product_id,
       random() AS p_cart, random() AS p_checkout, random() AS p_buy, 1 + floor(random() * 4)::int AS views
  FROM app.customers c
 CROSS JOIN LATERAL generate_series(1, 1 + floor(random() * 3)::int + 0 * length(c.id)) s  -- per customer: 1 to 3 visits
 WHERE random() < 0.8;

-- Every event of the shop in one statement, as an import would load it.
INSERT INTO nudge.events (user_id, event, occurred_at, props)
SELECT customer_id, event, occurred_at, props FROM (
    SELECT s.customer_id, 'product_viewed' AS event, s.started + v * interval '40 seconds' AS occurred_at,
           jsonb_build_object('product_id', p.id, 'product_name', p.name, 'price', p.price) AS props
      FROM sessions s JOIN app.products p ON p.id = s.product_id, generate_series(1, s.views) v
    UNION ALL
    SELECT s.customer_id, 'cart_added', s.started + interval '3 minutes',
           jsonb_build_object('cart_id', s.customer_id || '-' || s.n, 'product_id', p.id,
                              'product_name', p.name, 'price', p.price)
      FROM sessions s JOIN app.products p ON p.id = s.product_id
     WHERE s.p_cart < 0.45
    UNION ALL
    SELECT s.customer_id, 'checkout_started', s.started + interval '4 minutes',
           jsonb_build_object('cart_id', s.customer_id || '-' || s.n)
      FROM sessions s
     WHERE s.p_cart < 0.45 AND s.p_checkout < 0.6
) e
ORDER BY occurred_at;

-- Orders land in the application's own table, which pg_nudge reads as `purchased`.
INSERT INTO app.orders (customer_id, cart_id, total, created_at)
SELECT s.customer_id, s.customer_id || '-' || s.n, p.price, s.started + interval '4 minutes 30 seconds'
  FROM sessions s JOIN app.products p ON p.id = s.product_id
 WHERE s.p_cart < 0.45 AND s.p_checkout < 0.6 AND s.p_buy < 0.7
 ORDER BY 4;
-- Trailhead+ trials: a tenth of the customers started one in the past two
-- days, for ten days.
INSERT INTO nudge.events (user_id, event, occurred_at, props)
SELECT c.id, 'trial_started', t.at, jsonb_build_object('trial_ends_at', t.at + interval '10 days')
  FROM app.customers c
 CROSS JOIN LATERAL (SELECT now() - random() * interval '48 hours' - length(c.id) * interval '0 seconds' AS at) t
 WHERE random() < 0.1;
COMMIT;
