-- What goes out is what the rules say when it goes out: a message held in
-- the outbox (for a retry, quiet hours, a send window) is looked at again
-- before a mailer gets it.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Your cart', '<p>cart</p>');
SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added"}, "unless": [{"event": "purchased"}], "template": "t"}');
SELECT nudge.define_trigger('other', '{"on": {"event": "signed_up"}, "template": "t"}');
INSERT INTO nudge.profiles (user_id, email)
SELECT 'h' || g, 'h' || g || '@example.com' FROM generate_series(1, 6) g;
INSERT INTO nudge.events (user_id, event, occurred_at)
SELECT 'h' || g, CASE WHEN g <= 4 THEN 'cart_added' ELSE 'signed_up' END, now() - interval '1 minute'
  FROM generate_series(1, 6) g;
SELECT nudge.run_due() AS written;
-- a mailer's first try fails for all six; they wait an hour for a retry
SET nudge.retry_base_seconds = 7200;
SELECT count(nudge.fail(id, 'smtp 451')) AS retried FROM nudge.claim(10);
SELECT count(*) AS later FROM nudge.outbox WHERE status = 'pending' AND available_at > now() + interval '30 minutes';
-- the hour passes (the test moves the messages' times back instead of the clock on)
UPDATE nudge.outbox SET available_at = now() - interval '1 second', checked_at = checked_at - interval '1 hour',
                        created_at = created_at - interval '1 hour';
-- not re-checked yet: nothing to claim
SELECT count(*) AS claimable_before_recheck FROM nudge.claim(10);
-- meanwhile h1 bought, h2 unsubscribed, h3's address bounced (another
-- user's record), and trigger 'other' (h5, h6) is paused
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('h1', 'purchased', now() - interval '10 seconds');
INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('h2@example.com', 'h2', 'unsubscribed');
INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('h3@example.com', 'someone', 'bounced');
SELECT nudge.pause_trigger('other');
SELECT nudge.run_due() AS written;
SELECT user_id, status, rule, last_error FROM nudge.outbox WHERE status = 'cancelled' ORDER BY user_id;
SELECT user_id, state, reason FROM nudge.enrollments WHERE user_id = 'h1';
-- the claim: h4 goes; h2 and h3 are cancelled; h5 and h6 (paused) wait
SELECT user_id FROM nudge.claim(10) ORDER BY user_id;
SELECT user_id, status, rule FROM nudge.outbox ORDER BY user_id;
-- a paused trigger's messages go when it is resumed (after the re-check
-- they waited for: a pause is not a check); a dropped one's never
SELECT nudge.resume_trigger('other');
SELECT count(*) AS claimable_before_recheck FROM nudge.claim(1);
SELECT nudge.run_due() AS written;
SELECT user_id FROM nudge.claim(1);
SELECT nudge.drop_trigger('other');
SELECT count(*) AS claimed FROM nudge.claim(10);
SELECT user_id, status, rule, last_error FROM nudge.outbox WHERE user_id IN ('h5', 'h6') ORDER BY user_id;
SELECT status, messages FROM nudge.outbox_metrics() WHERE status = 'cancelled';

-- a cap counts a message at its scheduled time, not at the end of its lease
SELECT nudge.define_trigger('daily', '{"on": {"event": "daily"}, "cap": [{"max": 1, "per": "1 day"}], "reentry": "every_time", "template": "t"}');
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('h4', 'daily', now() - interval '2 days');
SELECT nudge.run_due(now() - interval '2 days') AS written;
SELECT count(*) AS claimed FROM nudge.claim(10, '2 days');
SELECT scheduled_at < now() - interval '1 day' AS scheduled_kept, available_at > now() + interval '1 day' AS lease_end
  FROM nudge.outbox WHERE trigger = 'daily';
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('h4', 'daily', now() - interval '1 minute');
SELECT nudge.run_due() AS written;
SELECT state, reason LIKE 'message %' AS went FROM nudge.enrollments WHERE trigger = 'daily' ORDER BY entered_at;

-- explain shows the exit found before the message went out; a misspelled trigger is an error
SELECT step, detail FROM nudge.explain('cart', 'h1') WHERE step <> 'entered';
SELECT * FROM nudge.explain('crat', 'h1');

-- run_due_report says what a pass did and what is still due
INSERT INTO nudge.profiles (user_id, email) VALUES ('r1', 'r1@example.com'), ('r2', 'r2@example.com');
INSERT INTO nudge.suppressions (email, user_id, reason) VALUES ('r2@example.com', 'r2', 'unsubscribed');
INSERT INTO nudge.events (user_id, event, occurred_at)
SELECT u, 'cart_added', now() - interval '1 minute' FROM unnest(ARRAY['r1', 'r2', 'r3']) u;
SELECT * FROM nudge.run_due_report(now(), 2);
SELECT * FROM nudge.run_due_report(now(), 2);
SELECT * FROM nudge.run_due_report(now(), -1);
