-- Engagement flows back: events of the user, first-seen times on the message,
-- suppressions for hard bounces and complaints, withdrawn consent for unsubscribes.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Hi {{ user_id }}', '<p>hi</p>');
SELECT nudge.define_trigger('welcome', '{"on": {"event": "signed_up"}, "template": "t"}');
-- a follow-up that an unsubscribe (written back as email_unsubscribed) cancels
SELECT nudge.define_trigger('follow_up', '{"on": {"event": "signed_up"}, "wait": "3 days",
  "unless": [{"event": "email_unsubscribed"}], "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) VALUES
  ('ann', 'Ann@Example.com'), ('ben', 'ben@example.com'), ('cat', 'cat@example.com'), ('dan', 'dan@example.com');
SELECT count(nudge.track(u, 'signed_up', '{}', '2026-01-05 10:00+00')) FROM unnest(ARRAY['ann', 'ben', 'cat', 'dan']) u;
SELECT nudge.run_due('2026-01-05 10:01+00') AS written;
SELECT count(*) AS claimed FROM nudge.claim(10);
SELECT count(nudge.ack(id)) FROM nudge.outbox;

-- ann: delivered, opened twice (the first time is kept), clicked
SELECT nudge.record_engagement(message_key, 'delivered', '2026-01-05 10:02+00') FROM nudge.outbox WHERE user_id = 'ann';
SELECT nudge.record_engagement(message_key, 'opened', '2026-01-05 11:00+00', '{"ua": "phone"}') FROM nudge.outbox WHERE user_id = 'ann';
SELECT nudge.record_engagement(message_key, 'opened', '2026-01-05 12:00+00') FROM nudge.outbox WHERE user_id = 'ann';
SELECT nudge.record_engagement(message_key, 'clicked', '2026-01-05 12:05+00') FROM nudge.outbox WHERE user_id = 'ann';
SELECT delivered_at, opened_at, clicked_at, bounced_at FROM nudge.outbox WHERE user_id = 'ann';
SELECT event, occurred_at, props->>'ua' AS ua, props ? 'message_key' AS has_key, props->>'trigger' AS trigger
  FROM nudge.events WHERE user_id = 'ann' AND event LIKE 'email_%' ORDER BY occurred_at;

-- ben hard-bounces, cat soft-bounces, dan unsubscribes
SELECT nudge.record_engagement(message_key, 'bounced', '2026-01-05 10:03+00', '{"type": "hard", "smtp": "550"}') FROM nudge.outbox WHERE user_id = 'ben';
SELECT nudge.record_engagement(message_key, 'bounced', '2026-01-05 10:03+00', '{"type": "soft"}') FROM nudge.outbox WHERE user_id = 'cat';
SELECT nudge.record_engagement(message_key, 'unsubscribed', '2026-01-06 09:00+00') FROM nudge.outbox WHERE user_id = 'dan';
SELECT email, user_id, reason FROM nudge.suppressions ORDER BY email;
-- an unsubscribe withdraws consent (from all topics unless meta names one):
-- marketing stops, a receipt still goes
SELECT user_id, topic, status, source FROM nudge.subscriptions ORDER BY user_id;

-- three days later: ben is suppressed, cat is not, dan's follow-up exited on his unsubscribe
SELECT nudge.run_due('2026-01-08 11:00+00') AS written;
SELECT user_id, state, reason FROM nudge.enrollments WHERE trigger = 'follow_up' ORDER BY user_id;
SELECT user_id FROM nudge.outbox WHERE trigger = 'follow_up' ORDER BY user_id;
SELECT step, detail FROM nudge.explain('follow_up', 'ben');

-- mistakes: unknown key, unknown kind, meta that is not an object; nothing is recorded
SELECT nudge.record_engagement('nm_nope', 'opened');
SELECT nudge.record_engagement(message_key, 'liked') FROM nudge.outbox WHERE user_id = 'ann' AND trigger = 'welcome';
SELECT nudge.record_engagement(message_key, 'opened', now(), '[1]') FROM nudge.outbox WHERE user_id = 'ann' AND trigger = 'welcome';
SELECT count(*) AS engagement_events FROM nudge.events WHERE event LIKE 'email_%';
