-- A user's own table as an event source: app.orders rows are `purchased` events.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
DROP SCHEMA IF EXISTS app CASCADE;
CREATE SCHEMA app;
CREATE TABLE app.orders (id bigserial PRIMARY KEY, customer_id text NOT NULL, cart_id text, total numeric, created_at timestamptz NOT NULL);

-- an order that existed before the table became a source
INSERT INTO app.orders (customer_id, cart_id, total, created_at) VALUES ('old', 'k0', 10, '2026-01-05 11:00+00');

SELECT nudge.add_source('app.orders', 'customer_id', time_column => 'created_at', event_name => 'purchased');
SELECT source, user_column, event_column, time_column, props_column, event_name FROM nudge.sources ORDER BY source::text;

-- mistakes name the column and change nothing
SELECT nudge.add_source('app.orders', 'customer_id', time_column => 'created', event_name => 'purchased');
SELECT nudge.add_source('app.orders', 'nobody', event_name => 'purchased');
SELECT nudge.add_source('app.orders', 'customer_id');
SELECT count(*) AS sources FROM nudge.sources;

SELECT nudge.define_template('cart_reminder', 'Your cart {{ event.cart_id }}', '<p>{{ event.cart_id }}</p>');
SELECT nudge.define_trigger('cart_abandon', '{
  "on": {"event": "cart_added", "key": "cart_id"},
  "wait": "24 hours",
  "unless": [{"event": "purchased", "same_key": true}],
  "template": "cart_reminder"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com'), ('u2', 'u2@example.com'), ('old', 'old@example.com');

SELECT nudge.track('u1', 'cart_added', '{"cart_id": "k1"}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('u2', 'cart_added', '{"cart_id": "k2"}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('old', 'cart_added', '{"cart_id": "k0"}', '2026-01-05 10:00+00') > 0 AS tracked;

-- u1 orders cart k1 (one multi-row statement with another user's order of another cart)
INSERT INTO app.orders (customer_id, cart_id, total, created_at) VALUES
  ('u1', 'k1', 99.5, '2026-01-05 12:00+00'),
  ('u2', 'other', 10, '2026-01-05 12:00+00');
SELECT user_id, key, state, reason FROM nudge.enrollments ORDER BY user_id;

-- at send time, the order that predates add_source cancels too
SELECT nudge.run_due('2026-01-07 00:00+00') AS written;
SELECT user_id, key, state, reason FROM nudge.enrollments ORDER BY user_id;
SELECT user_id, subject FROM nudge.outbox ORDER BY user_id;

-- the props of a source row are the row itself
SELECT event, props->>'cart_id' AS cart, props->>'total' AS total FROM nudge.all_events WHERE user_id = 'u1' ORDER BY occurred_at;

-- after drop_source, orders are no longer events
SELECT nudge.drop_source('app.orders');
SELECT nudge.track('u1', 'cart_added', '{"cart_id": "k3"}', '2026-01-08 10:00+00') > 0 AS tracked;
INSERT INTO app.orders (customer_id, cart_id, total, created_at) VALUES ('u1', 'k3', 5, '2026-01-08 11:00+00');
SELECT key, state FROM nudge.enrollments WHERE user_id = 'u1' ORDER BY entered_at;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'app.orders'::regclass AND NOT tgisinternal;
SELECT nudge.drop_source('app.orders');

-- History of two tables loaded one table at a time gives the journeys of
-- event time: h1's cart adds (10:00 and 14:00) go in first, the 12:00 order
-- of that cart after; h2 lives the same day in time order.
SELECT nudge.add_source('app.orders', 'customer_id', time_column => 'created_at', event_name => 'purchased');
INSERT INTO nudge.events (user_id, event, occurred_at, props) VALUES
  ('h1', 'cart_added', '2026-02-01 10:00+00', '{"cart_id": "k9"}'),
  ('h1', 'cart_added', '2026-02-01 14:00+00', '{"cart_id": "k9"}');
SELECT key, entered_at, state, coalesced FROM nudge.enrollments WHERE user_id = 'h1';
INSERT INTO app.orders (customer_id, cart_id, total, created_at) VALUES ('h1', 'k9', 30, '2026-02-01 12:00+00');
SELECT nudge.track('h2', 'cart_added', '{"cart_id": "k9"}', '2026-02-01 10:00+00') > 0 AS tracked;
INSERT INTO app.orders (customer_id, cart_id, total, created_at) VALUES ('h2', 'k9', 30, '2026-02-01 12:00+00');
SELECT nudge.track('h2', 'cart_added', '{"cart_id": "k9"}', '2026-02-01 14:00+00') > 0 AS tracked;
SELECT user_id, key, entered_at, state, coalesced, reason FROM nudge.enrollments
 WHERE user_id IN ('h1', 'h2') ORDER BY user_id, entered_at;
SELECT nudge.drop_source('app.orders');
