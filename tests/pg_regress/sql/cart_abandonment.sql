-- Cart abandonment: "added to cart and did not purchase that cart within 24 hours".
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';

SELECT nudge.define_template('cart_reminder',
  'You left {{ event.product }} in your cart, {{ profile.first_name | default: "friend" }}',
  '<p>Hi {{ profile.first_name | default: "there" }}, cart {{ event.cart_id }} ({{ event.value }}) is waiting.</p>',
  'Cart {{ event.cart_id }}: {{ event.product }}');
SELECT nudge.define_trigger('cart_abandon', '{
  "on": {"event": "cart_added", "where": {"value": {"gte": 20}}, "key": "cart_id"},
  "wait": "24 hours",
  "unless": [{"event": "purchased", "same_key": true}],
  "template": "cart_reminder"}');

INSERT INTO nudge.profiles (user_id, email, timezone, attrs) VALUES
  ('ada', 'ada@example.com', 'Europe/London', '{"first_name": "Ada"}'),
  ('bob', 'bob@example.com', NULL, '{"first_name": "Bob"}'),
  ('cy',  'cy@example.com',  NULL, '{}'),
  ('dee', 'dee@example.com', NULL, '{"first_name": "Dee"}'),
  ('eve', 'eve@example.com', NULL, '{}'),
  ('fay', 'fay@example.com', NULL, '{}');

-- ada adds a cart and never buys: one message after the wait
SELECT nudge.track('ada', 'cart_added', '{"cart_id": "c1", "value": 40, "product": "Boots"}', '2026-01-05 10:00+00') > 0 AS tracked;
-- bob buys the cart he added: exited
SELECT nudge.track('bob', 'cart_added', '{"cart_id": "c2", "value": 25, "product": "Hat"}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('bob', 'purchased', '{"cart_id": "c2"}', '2026-01-05 12:00+00') > 0 AS tracked;
-- cy buys a different cart: still reminded of c3
SELECT nudge.track('cy', 'cart_added', '{"cart_id": "c3", "value": 30, "product": "Scarf"}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('cy', 'purchased', '{"cart_id": "c9"}', '2026-01-05 11:00+00') > 0 AS tracked;
-- dee adds the same cart twice: the second coalesces, one message
SELECT nudge.track('dee', 'cart_added', '{"cart_id": "c4", "value": 50, "product": "Coat"}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('dee', 'cart_added', '{"cart_id": "c4", "value": 55, "product": "Coat"}', '2026-01-05 15:00+00') > 0 AS tracked;
-- eve's cart is under the where-filter: never enters
SELECT nudge.track('eve', 'cart_added', '{"cart_id": "c5", "value": 5, "product": "Socks"}', '2026-01-05 10:00+00') > 0 AS tracked;
-- fay buys, but her purchase is loaded without the capture trigger: run_due still finds it
SELECT nudge.track('fay', 'cart_added', '{"cart_id": "c6", "value": 90, "product": "Bag"}', '2026-01-05 10:00+00') > 0 AS tracked;
ALTER TABLE nudge.events DISABLE TRIGGER nudge_capture;
INSERT INTO nudge.events (user_id, event, occurred_at, props) VALUES ('fay', 'purchased', '2026-01-05 13:00+00', '{"cart_id": "c6"}');
ALTER TABLE nudge.events ENABLE TRIGGER nudge_capture;

SELECT user_id, key, state, coalesced, due_at, reason FROM nudge.enrollments ORDER BY user_id, entered_at;

-- not yet due: nothing is written
SELECT nudge.run_due('2026-01-06 09:59:59+00') AS written;
SELECT count(*) AS outbox FROM nudge.outbox;

-- due: ada, cy and dee get one message each; fay's late-loaded purchase cancels hers
SELECT nudge.run_due('2026-01-06 10:00+00') AS written;
SELECT user_id, recipient, subject, text_body, status, available_at FROM nudge.outbox ORDER BY user_id;
SELECT html FROM nudge.outbox WHERE user_id = 'ada';
SELECT user_id, state, reason LIKE 'message nm_%' AS has_message, reason FROM nudge.enrollments ORDER BY user_id;

-- running again, later, sends nothing more
SELECT nudge.run_due('2026-01-08 00:00+00') AS written;
SELECT count(*) AS outbox, count(DISTINCT message_key) AS keys FROM nudge.outbox;

-- the same cart added again after the journey ended opens a new one
SELECT nudge.track('dee', 'cart_added', '{"cart_id": "c4", "value": 60, "product": "Coat"}', '2026-01-07 09:00+00') > 0 AS tracked;
SELECT key, state, entered_at, due_at FROM nudge.enrollments WHERE user_id = 'dee' ORDER BY entered_at;

-- why: the journal of one user
SELECT at, step, detail FROM nudge.explain('cart_abandon', 'dee');
SELECT at, step, detail FROM nudge.explain('cart_abandon', 'bob');

-- a paused trigger enrolls nobody and sends nothing until resumed
SELECT nudge.pause_trigger('cart_abandon');
SELECT nudge.track('ada', 'cart_added', '{"cart_id": "c7", "value": 40, "product": "Belt"}', '2026-01-08 09:00+00') > 0 AS tracked;
SELECT count(*) AS ada_enrollments FROM nudge.enrollments WHERE user_id = 'ada';
SELECT nudge.run_due('2026-01-09 00:00+00') AS written_while_paused;
SELECT nudge.resume_trigger('cart_abandon');
SELECT nudge.run_due('2026-01-09 00:00+00') AS written_after_resume;

-- dropping cancels what waits
SELECT nudge.track('ada', 'cart_added', '{"cart_id": "c8", "value": 40, "product": "Belt"}', '2026-01-09 09:00+00') > 0 AS tracked;
SELECT nudge.drop_trigger('cart_abandon');
SELECT key, state, reason FROM nudge.enrollments WHERE user_id = 'ada' ORDER BY entered_at;
