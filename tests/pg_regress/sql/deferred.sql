-- Deferred capture: an insert only queues its watched events (in its own
-- transaction); nudge.capture_pending(), nudge.run_due() or the worker
-- enrolls them later, in event time, with the result immediate capture gives.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
DROP SCHEMA IF EXISTS shop CASCADE;
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id bigserial, customer text, cart_id text, total numeric, at timestamptz);
SELECT nudge.add_source('shop.orders', 'customer', time_column => 'at', event_name => 'purchased');
SELECT nudge.define_template('t', 'Your cart', 'cart {{ event.cart_id }}');
SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added", "key": "cart_id"}, "wait": "1 hour",
  "unless": [{"event": "purchased", "same_key": true}], "template": "t"}');

SET nudge.deferred_capture = on;
SELECT count(nudge.track(u, 'cart_added', format('{"cart_id": "%s"}', k)::jsonb, '2026-02-01 10:00+00'))
  FROM (VALUES ('d1', 'k1'), ('d2', 'k2')) v(u, k);
-- an order of the user's own table, as a source row (props: the whole row)
INSERT INTO shop.orders (customer, cart_id, total, at) VALUES ('d1', 'k1', 25, '2026-02-01 10:20+00');
-- an event no trigger watches is not queued
SELECT nudge.track('d3', 'page_viewed', '{}', '2026-02-01 10:00+00') > 0 AS tracked;
-- a rolled-back insert takes its queued events back with it
BEGIN;
SELECT nudge.track('d4', 'cart_added', '{"cart_id": "k4"}', '2026-02-01 10:00+00') > 0 AS tracked;
ROLLBACK;
SELECT user_id, event, occurred_at, props->>'cart_id' AS cart_id FROM nudge.capture_queue ORDER BY user_id, occurred_at;
SELECT count(*) AS journeys_before FROM nudge.enrollments;
SELECT queued FROM nudge.worker_status();

SELECT nudge.capture_pending() AS captured;
SELECT user_id, key, state, reason FROM nudge.enrollments ORDER BY user_id;
SELECT count(*) AS still_queued FROM nudge.capture_queue;

-- run_due enrolls what is queued before it sends: d2's purchase arrives
-- queued and cancels its reminder
INSERT INTO shop.orders (customer, cart_id, total, at) VALUES ('d2', 'k2', 40, '2026-02-01 10:30+00');
SELECT nudge.run_due('2026-02-01 12:00+00') AS written;
SELECT user_id, key, state, reason FROM nudge.enrollments ORDER BY user_id;
SELECT at, step, detail FROM nudge.explain('cart', 'd2');
-- a text props column that is not JSON: the insert fails, naming the table, and queues nothing
CREATE TABLE shop.raw (who text, what text, at timestamptz, body text);
SELECT nudge.add_source('shop.raw', 'who', event_column => 'what', time_column => 'at', props_column => 'body');
INSERT INTO shop.raw VALUES ('d5', 'cart_added', '2026-02-01 10:00+00', '{not json');
SELECT count(*) AS queued FROM nudge.capture_queue;
SELECT nudge.drop_source('shop.raw');
RESET nudge.deferred_capture;
SELECT nudge.drop_source('shop.orders');
DROP SCHEMA shop CASCADE;
