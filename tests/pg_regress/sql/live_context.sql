-- Live data in messages: audience_sql and context queries run as the role
-- that defined the trigger; abort and fallback_template; failures stay per user.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
DROP SCHEMA IF EXISTS shop CASCADE;
CREATE SCHEMA shop;
CREATE TABLE shop.orders (customer_id text, created_at timestamptz);
CREATE TABLE shop.carts (customer_id text, cart_id text, total numeric);
CREATE TABLE shop.cart_items (cart_id text, sku text, name text, qty int);
CREATE TABLE shop.loyalty (customer_id text, points int);
CREATE TABLE shop.secrets (customer_id text, card_number text);
INSERT INTO shop.orders SELECT c, '2026-01-01' FROM unnest(ARRAY['u1', 'u1', 'u1', 'u2', 'u2', 'u2', 'u3']) c;
INSERT INTO shop.carts VALUES ('u1', 'k1', 84.50);
INSERT INTO shop.cart_items VALUES ('k1', 'B-1', 'Trail Boots', 1), ('k1', 'S-2', 'Wool Socks', 3);
INSERT INTO shop.loyalty VALUES ('u1', 1200), ('u2', 40);
INSERT INTO shop.secrets VALUES ('u1', '4111-1111-1111-1111');
INSERT INTO nudge.profiles (user_id, email, attrs) VALUES
  ('u1', 'u1@example.com', '{"first_name": "Ada"}'), ('u2', 'u2@example.com', '{}'), ('u3', 'u3@example.com', '{}');

DROP ROLE IF EXISTS regress_marketer;
CREATE ROLE regress_marketer LOGIN IN ROLE nudge_admin;
GRANT USAGE ON SCHEMA shop TO regress_marketer;
GRANT SELECT ON shop.orders, shop.carts, shop.cart_items, shop.loyalty TO regress_marketer;

SET ROLE regress_marketer;
SELECT nudge.define_template('cart_live',
  'Your cart: {{ context.cart.total }}',
  '{% if context.cart == nil %}{% abort "no open cart" %}{% endif %}<p>{{ profile.first_name | default: "Hi" }}, {{ context.loyalty.points }} points.</p>
<ul>{% for i in context.items %}<li>{{ i.qty }} x {{ i.name }}</li>{% endfor %}</ul>');
SELECT nudge.define_template('cart_generic', 'Still shopping?', '<p>Come back any time.</p>');

-- a query on a table the defining role may not read fails when defined, and nothing is written
SELECT nudge.define_trigger('leaky', '{"on": {"event": "cart_added"}, "template": "cart_live",
  "audience_sql": "SELECT card_number IS NOT NULL FROM shop.secrets WHERE customer_id = $1"}');
SELECT nudge.define_trigger('leaky', '{"on": {"event": "cart_added"}, "template": "cart_live",
  "context": {"card": "SELECT card_number FROM shop.secrets WHERE customer_id = $1"}}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "template": "cart_live",
  "audience_sql": "SELECT count(*) FROM shop.orders WHERE customer_id = $1"}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "template": "cart_live",
  "context": {"cart": "SELEC * FROM shop.carts"}}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "template": "cart_live",
  "context": {"my cart": "SELECT 1"}}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "template": "cart_live", "fallback_template": "nope"}');
SELECT count(*) AS triggers, (SELECT count(*) FROM nudge.user_sql) AS user_sql FROM nudge.triggers;

-- loyal customers (3 orders or more), with their live cart, items and points
SELECT nudge.define_trigger('cart_reminder', '{
  "on": {"event": "cart_added"}, "wait": "1 hour",
  "audience_sql": "SELECT count(*) >= 3 FROM shop.orders WHERE customer_id = $1",
  "context": {
    "cart":    "SELECT cart_id, total FROM shop.carts WHERE customer_id = $1",
    "items":   "SELECT i.sku, i.name, i.qty FROM shop.cart_items i JOIN shop.carts c USING (cart_id) WHERE c.customer_id = $1 ORDER BY i.sku",
    "loyalty": "SELECT points FROM shop.loyalty WHERE customer_id = $1"},
  "template": "cart_live", "fallback_template": "cart_generic"}');
SELECT part, owner FROM nudge.user_sql ORDER BY part;
RESET ROLE;

-- u3 has one order: not in the audience, turned away at entry
SELECT count(nudge.track(u, 'cart_added', '{}', '2026-02-01 10:00+00')) FROM unnest(ARRAY['u1', 'u2', 'u3']) u;
SELECT user_id, state FROM nudge.enrollments ORDER BY user_id;
SELECT step, detail FROM nudge.explain('cart_reminder', 'u3');

SELECT nudge.run_due('2026-02-01 12:00+00') AS written;
-- u1: the live cart, items (several rows: a list) and points (one row: an object);
-- u2 has no cart: the template aborts and the fallback goes instead
SELECT user_id, subject, html FROM nudge.outbox ORDER BY user_id;
SELECT user_id, state, reason LIKE 'message %' AS sent, regexp_replace(reason, 'nm_[0-9a-f]+', 'nm_…') AS reason
  FROM nudge.enrollments ORDER BY user_id;
SELECT nudge.preview('cart_reminder', 'u1');

-- context changes are live: the next message reads the cart as it is then
UPDATE shop.carts SET total = 99.00;
SELECT nudge.track('u1', 'cart_added', '{}', '2026-02-02 10:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-02-02 12:00+00') AS written;
SELECT subject FROM nudge.outbox WHERE user_id = 'u1' ORDER BY id;

-- the queries run as the marketer, not as the superuser running run_due: once the
-- marketer may no longer read loyalty points, u1's message falls back to the generic
-- one; a trigger without a fallback fails the enrollment with the permission error
SET ROLE regress_marketer;
SELECT nudge.define_trigger('points', '{"on": {"event": "checked_points"}, "wait": "1 hour",
  "context": {"loyalty": "SELECT points FROM shop.loyalty WHERE customer_id = $1"}, "template": "cart_generic"}');
RESET ROLE;
REVOKE SELECT ON shop.loyalty FROM regress_marketer;
SELECT nudge.track('u1', 'cart_added', '{}', '2026-02-03 10:00+00') > 0 AS tracked;
SELECT nudge.track('u1', 'checked_points', '{}', '2026-02-03 10:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-02-03 12:00+00') AS written;
SELECT trigger, state, regexp_replace(reason, 'nm_[0-9a-f]+', 'nm_…') AS reason
  FROM nudge.enrollments WHERE entered_at = '2026-02-03 10:00+00' ORDER BY trigger;

-- a context query that fails for one user fails (or falls back for) that user only
SET ROLE regress_marketer;
SELECT nudge.define_trigger('fragile', '{"on": {"event": "poked"}, "wait": "1 hour",
  "context": {"cart": "SELECT 1 / (CASE WHEN $1 = ''u2'' THEN 0 ELSE 1 END) AS one"},
  "template": "cart_generic"}');
RESET ROLE;
SELECT count(nudge.track(u, 'poked', '{}', '2026-02-04 10:00+00')) FROM unnest(ARRAY['u1', 'u2']) u;
SELECT nudge.run_due('2026-02-04 12:00+00') AS written;
SELECT user_id, state, regexp_replace(reason, 'nm_[0-9a-f]+', 'nm_…') AS reason
  FROM nudge.enrollments WHERE trigger = 'fragile' ORDER BY user_id;

-- user SQL runs under nudge.user_sql_timeout: a slow query leaves its message
-- waiting to be tried again later (poison.sql), it never fails the pass
SET ROLE regress_marketer;
SELECT nudge.define_trigger('slow', '{"on": {"event": "slow"}, "context": {"nap": "SELECT pg_sleep(1) AS slept"},
  "template": "cart_generic"}');
RESET ROLE;
SET nudge.user_sql_timeout = 100;
SELECT nudge.track('u1', 'slow', '{}', '2026-02-05 10:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-02-05 12:00+00') AS written;
SELECT state, reason FROM nudge.enrollments WHERE trigger = 'slow';
RESET nudge.user_sql_timeout;

DROP SCHEMA shop CASCADE;
DROP OWNED BY regress_marketer;
DROP ROLE regress_marketer;
