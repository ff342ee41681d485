-- One event per transaction, as an application writes them: Zipf users, the
-- funnel's mix (70% views, 15% cart adds, 9% checkouts, 6% purchases).
\set u random_zipfian(1, 100000, 1.07)
\set r random(1, 100)
\set p random(1, 500)
\set k random(1, 5000000)
INSERT INTO bench.TABLE (user_id, event, occurred_at, props)
VALUES ('u' || :u::int,
        CASE WHEN :r::int <= 70 THEN 'product_viewed' WHEN :r <= 85 THEN 'cart_added'
             WHEN :r <= 94 THEN 'checkout_started' ELSE 'purchased' END,
        now(), jsonb_build_object('product_id', :p::int, 'cart_id', 'i' || :k, 'price', 19.99, 'total', 19.99));
