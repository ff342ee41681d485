-- The benchmark's shop: customers (the profile source), and two identical
-- event tables: bench.plain (no pg_nudge) and bench.events (a source of pg_nudge
-- with five active triggers). Same columns, same index.
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS pg_nudge;
CREATE SCHEMA bench;
CREATE TABLE bench.customers (
    id         text PRIMARY KEY,
    email      text NOT NULL,
    first_name text,
    timezone   text,
    opted_in   boolean NOT NULL
);
INSERT INTO bench.customers
SELECT 'u' || i, 'u' || i || '@shop.example',
       (ARRAY['Ada', 'Bruno', 'Chloe', 'Dmitri', 'Elena', NULL])[1 + i % 6],
       (ARRAY['Europe/Berlin', 'America/New_York', 'UTC'])[1 + i % 3],
       i % 10 <> 0
  FROM generate_series(1, :users) i;

CREATE TABLE bench.plain (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text        NOT NULL,
    event       text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    props       jsonb       NOT NULL
);
CREATE INDEX ON bench.plain (user_id, occurred_at);
CREATE TABLE bench.events (LIKE bench.plain INCLUDING ALL);

SELECT nudge.add_source('bench.events', 'user_id', event_column => 'event',
                        time_column => 'occurred_at', props_column => 'props');
SELECT nudge.set_profile_query($$
    SELECT email, first_name, timezone, opted_in FROM bench.customers WHERE id = $1
$$);

SELECT nudge.define_template('cart',
  'Still thinking about product {{ event.product_id }}, {{ profile.first_name | default: "friend" }}?',
  '<h1>Your cart is waiting</h1><p>Hi {{ profile.first_name | default: "there" }}, product
{{ event.product_id }} (${{ event.price }}) is still in cart {{ event.cart_id }}.</p>
<p><a href="https://shop.example/cart/{{ event.cart_id }}">Return to your cart</a></p>');
SELECT nudge.define_template('checkout', 'Your order is one step away',
  '<p>{{ profile.first_name | default: "Hi" }}, finish checkout of cart {{ event.cart_id }}.</p>');
SELECT nudge.define_template('thanks', 'How is your order?',
  '<p>Thanks for your order of ${{ event.total }}, {{ profile.first_name | default: "friend" }}.</p>');
SELECT nudge.define_template('browse', 'Product {{ event.product_id }} is still here',
  '<p>{{ profile.first_name | default: "Hi" }}, you looked at product {{ event.product_id }}.</p>');
SELECT nudge.define_template('ping', 'ping', '<p>{{ event.n }}</p>');

-- The five triggers of the capture benchmark: every event kind is watched.
SELECT nudge.define_trigger('cart_abandonment', '{
  "on": {"event": "cart_added", "key": "cart_id"}, "wait": "4 hours",
  "unless": [{"event": "purchased", "same_key": true}],
  "audience": {"opted_in": {"eq": true}}, "priority": 10, "template": "cart"}');
SELECT nudge.define_trigger('checkout_abandonment', '{
  "on": {"event": "checkout_started", "key": "cart_id"}, "wait": "1 hour",
  "unless": [{"event": "purchased", "same_key": true}], "priority": 20, "template": "checkout"}');
SELECT nudge.define_trigger('post_purchase', '{
  "on": {"event": "purchased"}, "wait": "48 hours", "quiet_hours": {"start": "21:00", "end": "08:00"},
  "template": "thanks"}');
SELECT nudge.define_trigger('browse_abandonment', '{
  "on": {"event": "product_viewed"}, "wait": "2 hours",
  "unless": [{"event": "cart_added"}, {"event": "purchased"}],
  "reentry": {"cooldown": "1 day"}, "template": "browse"}');
SELECT nudge.define_trigger('high_intent', '{
  "on": {"event": "product_viewed", "key": "product_id", "min_count": 3, "within": "1 day"},
  "wait": "30 minutes", "unless": [{"event": "cart_added"}], "template": "browse"}');
