-- Roles: a mailer can claim, ack, fail and record engagement, and nothing else;
-- a writer can track events, and nothing else.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Hi', '<p>hi</p>');
SELECT nudge.define_trigger('now', '{"on": {"event": "ping"}, "template": "t"}');
INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');

DROP ROLE IF EXISTS regress_mailer;
DROP ROLE IF EXISTS regress_writer;
CREATE ROLE regress_mailer LOGIN IN ROLE nudge_mailer;
CREATE ROLE regress_writer LOGIN IN ROLE nudge_writer;

-- the writer tracks; capture switches to the extension owner only for its own statements
SET ROLE regress_writer;
SELECT nudge.track('u1', 'ping', '{}', now() - interval '1 minute') > 0 AS tracked;
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('u1', 'ping', now() - interval '30 seconds');
SELECT count(*) FROM nudge.enrollments;
SELECT * FROM nudge.claim(1);
SELECT nudge.define_trigger('mine', '{"on": {"event": "x"}, "template": "t"}');
RESET ROLE;

-- capture runs with our rights, so it must never resolve a name in the
-- writer's schemas: a writer's hashtext() ahead of pg_catalog is not called
CREATE SCHEMA regress_evil AUTHORIZATION regress_writer;
SET ROLE regress_writer;
CREATE FUNCTION regress_evil.hashtext(text) RETURNS int LANGUAGE plpgsql
AS $$ BEGIN RAISE EXCEPTION 'capture ran the writer''s hashtext'; END $$;
SET search_path = regress_evil, pg_catalog;
INSERT INTO nudge.events (user_id, event, occurred_at) VALUES ('u1', 'ping', now() - interval '20 seconds');
RESET search_path;
RESET ROLE;
DROP SCHEMA regress_evil CASCADE;
SELECT count(*) AS journeys FROM nudge.enrollments;

SELECT nudge.run_due() AS written;

SET ROLE regress_mailer;
SELECT count(*) AS claimed FROM nudge.claim(10, '5 minutes', 'regress');
SELECT bool_and(nudge.ack(id)) AS acked FROM nudge.outbox WHERE status = 'claimed' AND user_id = 'u1' AND id = (SELECT min(id) FROM nudge.outbox);
SELECT nudge.fail(id, 'temporary') FROM nudge.outbox WHERE status = 'claimed';
SELECT nudge.record_engagement(message_key, 'opened') FROM nudge.outbox WHERE status = 'sent';
SELECT count(*) AS outbox_rows FROM nudge.outbox;
SELECT status, messages FROM nudge.outbox_metrics() WHERE status = 'sent';
-- and nothing else
SELECT nudge.define_trigger('evil', '{"on": {"event": "x"}, "template": "t"}');
SELECT nudge.define_template('evil', 's', 'h');
SELECT count(*) FROM nudge.events;
SELECT count(*) FROM nudge.profiles;
SELECT nudge.track('u1', 'ping');
SELECT nudge.run_due();
UPDATE nudge.outbox SET status = 'sent';
RESET ROLE;

DROP ROLE regress_mailer;
DROP ROLE regress_writer;
