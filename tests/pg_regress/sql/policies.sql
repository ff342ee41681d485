-- Who gets what, and when: re-entry, audience, caps, priority, quiet hours, send windows.
-- Each rule is shown letting through and holding back, and explain says why.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', '{{ trigger }} for {{ user_id }}', '<p>hi</p>');
INSERT INTO nudge.profiles (user_id, email, timezone, attrs) VALUES
  ('de', 'de@example.com', 'Europe/Berlin',    '{"country": "DE", "vip": true}'),
  ('fr', 'fr@example.com', 'Europe/Paris',     '{"country": "FR"}'),
  ('ny', 'ny@example.com', 'America/New_York', '{"country": "US"}'),
  ('nz', 'nz@example.com', NULL,               '{"country": "NZ"}');

-- == Re-entry ==
SELECT nudge.define_trigger('welcome_once', '{"expire_after": "never", "on": {"event": "signed_up"}, "wait": "1 hour", "reentry": "once", "template": "t"}');
SELECT nudge.define_trigger('every_view', '{"expire_after": "never", "on": {"event": "viewed"}, "wait": "1 hour", "reentry": "every_time", "template": "t"}');
SELECT nudge.define_trigger('cooled', '{"expire_after": "never", "on": {"event": "browsed"}, "wait": "1 hour", "reentry": {"cooldown": "1 day"}, "template": "t"}');
SELECT count(nudge.track('de', e, '{}', at::timestamptz)) FROM (VALUES
  ('signed_up', '2026-01-05 10:00+00'), ('signed_up', '2026-01-08 10:00+00'),  -- once: the second is refused
  ('viewed',    '2026-01-05 10:00+00'), ('viewed',    '2026-01-05 10:20+00'),  -- every_time: two journeys
  ('browsed',   '2026-01-05 10:00+00'), ('browsed',   '2026-01-05 20:00+00'),  -- within a day of the end: refused
  ('browsed',   '2026-01-06 12:00+00')                                         -- after the cooldown: enters
) AS e(e, at);
SELECT trigger, entered_at, state FROM nudge.enrollments WHERE user_id = 'de' ORDER BY trigger, entered_at;
SELECT at, step, detail FROM nudge.explain('welcome_once', 'de');
SELECT at, step, detail FROM nudge.explain('cooled', 'de') WHERE step = 'not entered';
SELECT nudge.drop_trigger(t) FROM unnest(ARRAY['welcome_once', 'every_view', 'cooled']) t;

-- == Repeated entry: "viewed the same product 3 times within an hour" ==
SELECT nudge.define_trigger('keen', '{"expire_after": "never", "on": {"event": "viewed_product", "key": "sku", "min_count": 3, "within": "1 hour"},
  "wait": "10 minutes", "template": "t"}');
SELECT count(nudge.track('ny', 'viewed_product', jsonb_build_object('sku', sku), at::timestamptz)) FROM (VALUES
  ('A', '2026-01-05 10:00+00'), ('A', '2026-01-05 10:20+00'), ('B', '2026-01-05 10:30+00'),  -- two of A, one of B
  ('A', '2026-01-05 10:50+00'),                                                             -- third A within the hour: enters
  ('B', '2026-01-05 12:00+00'), ('B', '2026-01-05 12:50+00'), ('B', '2026-01-05 14:00+00')  -- never three B within an hour
) AS v(sku, at);
SELECT key, entered_at FROM nudge.enrollments WHERE trigger = 'keen';
-- loaded at once, the same history gives the same journey
SELECT nudge.drop_trigger('keen');
SELECT nudge.define_trigger('keen2', '{"expire_after": "never", "on": {"event": "viewed_product", "key": "sku", "min_count": 3, "within": "1 hour"},
  "wait": "10 minutes", "template": "t"}');
INSERT INTO nudge.events (user_id, event, props, occurred_at)
SELECT 'nz', 'viewed_product', jsonb_build_object('sku', sku), at::timestamptz FROM (VALUES
  ('A', '2026-01-05 10:00+00'), ('A', '2026-01-05 10:20+00'), ('B', '2026-01-05 10:30+00'), ('A', '2026-01-05 10:50+00'),
  ('B', '2026-01-05 12:00+00'), ('B', '2026-01-05 12:50+00'), ('B', '2026-01-05 14:00+00')) AS v(sku, at);
SELECT key, entered_at FROM nudge.enrollments WHERE trigger = 'keen2';
SELECT nudge.drop_trigger('keen2');

-- == Audience ==
SELECT nudge.define_trigger('dach_only', '{"expire_after": "never", "on": {"event": "cart_added"}, "wait": "1 hour",
  "audience": {"country": {"in": ["DE", "AT", "CH"]}}, "template": "t"}');
SELECT count(nudge.track(u, 'cart_added', '{}', '2026-01-10 10:00+00')) FROM unnest(ARRAY['de', 'fr']) u;
SELECT user_id, state FROM nudge.enrollments WHERE trigger = 'dach_only' ORDER BY user_id;
SELECT step, detail FROM nudge.explain('dach_only', 'fr');
-- checked again at send time: de moved to France in between
UPDATE nudge.profiles SET attrs = attrs || '{"country": "FR"}' WHERE user_id = 'de';
SELECT nudge.run_due('2026-01-10 12:00+00') AS written;
SELECT user_id, state, reason FROM nudge.enrollments WHERE trigger = 'dach_only';
UPDATE nudge.profiles SET attrs = attrs || '{"country": "DE"}' WHERE user_id = 'de';
SELECT nudge.drop_trigger('dach_only');

-- == Caps, and transactional messages that bypass them ==
SELECT nudge.configure('{"caps": [{"max": 1, "per": "16 hours"}]}');
SELECT nudge.define_trigger('promo_a', '{"expire_after": "never", "on": {"event": "promo_a"}, "template": "t"}');
SELECT nudge.define_trigger('promo_b', '{"expire_after": "never", "on": {"event": "promo_b"}, "template": "t"}');
SELECT nudge.define_trigger('receipt', '{"expire_after": "never", "on": {"event": "paid"}, "transactional": true, "template": "t"}');
SELECT nudge.define_trigger('daily', '{"expire_after": "never", "on": {"event": "daily"}, "cap": [{"max": 1, "per": "1 day"}], "reentry": "every_time", "template": "t"}');
SELECT count(nudge.track('fr', e, '{}', at::timestamptz)) FROM (VALUES
  ('promo_a', '2026-01-20 09:00+00'),   -- sent
  ('promo_b', '2026-01-20 15:00+00'),   -- 6 hours later: held by the global cap
  ('paid',    '2026-01-20 16:00+00'),   -- transactional: sent anyway
  ('promo_b', '2026-01-21 02:00+00')    -- 17 hours after promo_a: sent
) AS e(e, at);
SELECT nudge.run_due('2026-01-22 00:00+00') AS written;
SELECT trigger, entered_at, state, reason LIKE 'message %' AS sent, CASE WHEN state <> 'sent' THEN reason END AS why
  FROM nudge.enrollments WHERE user_id = 'fr' ORDER BY entered_at;
-- a trigger's own cap counts only its own messages (global caps off)
SELECT nudge.configure('{"caps": null}');
SELECT count(nudge.track('nz', 'daily', '{}', at::timestamptz)) FROM unnest(ARRAY['2026-01-20 09:00+00', '2026-01-20 12:00+00', '2026-01-21 10:00+00']) at;
SELECT nudge.run_due('2026-01-22 00:00+00') AS written;
SELECT entered_at, state, CASE WHEN state <> 'sent' THEN reason END AS why FROM nudge.enrollments WHERE trigger = 'daily' ORDER BY entered_at;
SELECT nudge.drop_trigger(t) FROM unnest(ARRAY['promo_a', 'promo_b', 'receipt', 'daily']) t;

-- == Priority across triggers ==
SELECT nudge.configure('{"arbitration_window": "30 minutes"}');
SELECT nudge.define_trigger('browse', '{"expire_after": "never", "on": {"event": "viewed"}, "wait": "1 hour", "priority": 1, "template": "t"}');
SELECT nudge.define_trigger('cart', '{"expire_after": "never", "on": {"event": "carted"}, "wait": "1 hour", "priority": 5, "template": "t"}');
SELECT nudge.define_trigger('newsletter', '{"expire_after": "never", "on": {"event": "subscribed"}, "wait": "1 hour", "priority": 1,
  "on_conflict": "defer", "template": "t"}');
SELECT count(nudge.track('de', e, '{}', at::timestamptz)) FROM (VALUES
  ('viewed', '2026-02-01 10:00+00'), ('carted', '2026-02-01 10:10+00'), ('subscribed', '2026-02-01 10:05+00')
) AS e(e, at);
SELECT nudge.run_due('2026-02-01 12:00+00') AS written;
SELECT trigger, state, reason FROM nudge.enrollments WHERE trigger IN ('browse', 'cart', 'newsletter') ORDER BY trigger;
SELECT trigger, available_at FROM nudge.outbox WHERE trigger IN ('cart', 'newsletter') ORDER BY trigger;
SELECT nudge.configure('{"arbitration_window": null}');
-- without a window, priority alone still decides between messages due at
-- the same instant, in one pass or in two
INSERT INTO nudge.profiles (user_id, email) VALUES ('pr', 'pr@example.com'), ('ps', 'ps@example.com');
SELECT count(nudge.track('pr', e, '{}', '2026-02-02 10:00+00')) FROM unnest(ARRAY['viewed', 'carted']) e;
SELECT count(nudge.track('ps', 'carted', '{}', '2026-02-02 10:00+00'));
SELECT nudge.run_due('2026-02-02 12:00+00') AS written;
SELECT count(nudge.track('ps', 'viewed', '{}', '2026-02-02 10:00+00'));
SELECT nudge.run_due('2026-02-02 12:00+00') AS written;
SELECT user_id, trigger, state, reason FROM nudge.enrollments WHERE user_id IN ('pr', 'ps') ORDER BY user_id, trigger;
SELECT nudge.drop_trigger(t) FROM unnest(ARRAY['browse', 'cart', 'newsletter']) t;

-- == Quiet hours and send windows, in the recipient's zone ==
SELECT nudge.define_trigger('nightly', '{"expire_after": "never", "on": {"event": "late"}, "wait": "30 minutes",
  "quiet_hours": {"start": "21:00", "end": "08:00"}, "template": "t"}');
-- 2026-03-08 is the night New York springs forward: due 06:30 UTC = 01:30 EST, in quiet
-- hours; the next allowed minute is 08:00 EDT = 12:00 UTC (an hour earlier in UTC than the day before)
SELECT nudge.track('ny', 'late', '{}', '2026-03-07 06:00+00') > 0 AS tracked;
SELECT nudge.track('ny', 'late', '{}', '2026-03-08 06:00+00') > 0 AS tracked;
-- de (Berlin): due 12:30 local, not in quiet hours: goes when due
SELECT nudge.track('de', 'late', '{}', '2026-03-08 11:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-03-09 00:00+00') AS written;
SET timezone = 'America/New_York';
SELECT o.user_id, e.due_at, o.available_at FROM nudge.outbox o JOIN nudge.enrollments e ON e.id = o.enrollment_id
 WHERE o.trigger = 'nightly' ORDER BY e.due_at;
SET timezone = 'UTC';
SELECT step, detail FROM nudge.explain('nightly', 'ny') WHERE step = 'sent';
-- nz has no zone: the default zone applies
SELECT nudge.configure('{"default_timezone": "Pacific/Auckland"}');
SELECT nudge.track('nz', 'late', '{}', '2026-03-09 09:00+00') > 0 AS tracked;   -- due 22:30 in Auckland
SELECT nudge.run_due('2026-03-10 00:00+00') AS written;
SELECT available_at FROM nudge.outbox WHERE trigger = 'nightly' AND user_id = 'nz';
SELECT nudge.drop_trigger('nightly');
SELECT nudge.define_trigger('office', '{"expire_after": "never", "on": {"event": "lead"}, "template": "t",
  "send_window": {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}}');
-- Saturday 2026-03-14 15:00 UTC = 11:00 EDT: moves to Monday 09:00 EDT = 13:00 UTC
SELECT nudge.track('ny', 'lead', '{}', '2026-03-14 15:00+00') > 0 AS tracked;
SELECT nudge.run_due('2026-03-15 00:00+00') AS written;
SELECT available_at FROM nudge.outbox WHERE trigger = 'office';

-- == Mistakes are named and change nothing ==
SELECT nudge.configure('{"caps": [{"max": 1, "per": "16 hourz"}]}');
SELECT nudge.configure('{"default_timezone": "Mars/Olympus"}');
SELECT nudge.configure('{"arbitraton_window": "5 minutes"}');
SELECT nudge.configure('[]');
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "t", "quiet_hours": {"start": "9pm", "end": "08:00"}}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "t", "reentry": "twice"}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "t", "audience": {"country": {"like": "D%"}}}');
SELECT nudge.configure('{}');

-- == "Did X, then no X for a while" ==
-- the session that opens a journey does not close it; the next one does, and opens its own
SELECT nudge.define_trigger('winback', '{"expire_after": "never", "on": {"event": "session"}, "unless": [{"event": "session"}], "wait": "7 days", "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('wb1', 'wb1@example.com'), ('wb2', 'wb2@example.com');
SELECT count(nudge.track(u, 'session', '{}', at::timestamptz)) FROM (VALUES
  ('wb1', '2026-05-01 10:00+00'), ('wb2', '2026-05-01 10:00+00'), ('wb2', '2026-05-03 10:00+00')) AS s(u, at);
SELECT nudge.run_due('2026-05-20') AS written;
SELECT user_id, entered_at, state, reason LIKE 'message %' AS went, CASE WHEN state <> 'sent' THEN reason END AS why
  FROM nudge.enrollments WHERE trigger = 'winback' ORDER BY user_id, entered_at;

-- == How late is too late ==
-- loading history with the engine running: what was due long ago expires
SELECT nudge.define_trigger('trial_end', '{"on": {"event": "trial_started"}, "wait": "14 days", "expire_after": "12 hours", "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('ex1', 'ex1@example.com'), ('ex2', 'ex2@example.com');
SELECT count(nudge.track(u, 'trial_started', '{}', at::timestamptz)) FROM (VALUES
  ('ex1', '2026-06-01 10:00+00'), ('ex2', '2026-06-15 09:00+00')) AS s(u, at);
SELECT nudge.run_due('2026-06-29 10:00+00') AS written;
SELECT user_id, state, reason LIKE 'message %' AS went, CASE WHEN state <> 'sent' THEN reason END AS why
  FROM nudge.enrollments WHERE trigger = 'trial_end' ORDER BY user_id;
SELECT nudge.define_trigger('bad', '{"on": {"event": "x"}, "template": "t", "expire_after": "0 seconds"}');
