-- Bad input: each mistake is a clear error naming what is wrong, and changes nothing.
DROP EXTENSION IF EXISTS pg_nudge CASCADE;
CREATE EXTENSION pg_nudge;
SET timezone = 'UTC';
SELECT nudge.define_template('t', 'Hello {{ profile.first_name }}', '<p>hi</p>');
SELECT nudge.define_trigger('good', '{"on": {"event": "cart_added"}, "wait": "1 hour", "template": "t"}');

-- unknown key at the top
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "wait": "1 hour", "template": "t", "priorty": 5}');
-- misspelled key inside a list
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "unless": [{"evnt": "purchased"}], "template": "t"}');
-- misspelled key inside on
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added", "wher": {}}, "template": "t"}');
-- bad interval
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "wait": "24 hourz", "template": "t"}');
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "wait": "1 month", "template": "t"}');
-- wrong type
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "wait": 24, "template": "t"}');
-- unknown template
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "template": "nope"}');
-- missing required key
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}}');
-- bad predicate operator
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added", "where": {"value": {"between": [1, 2]}}}, "template": "t"}');
-- same_key without a key
SELECT nudge.define_trigger('bad', '{"on": {"event": "cart_added"}, "unless": [{"event": "purchased", "same_key": true}], "template": "t"}');
-- not an object
SELECT nudge.define_trigger('bad', '[1, 2]');
SELECT nudge.define_trigger('bad', '"cart"');
-- a failed redefinition of an existing trigger leaves it as it was
SELECT nudge.define_trigger('good', '{"on": {"event": "cart_added"}, "wait": "soon", "template": "t"}');
SELECT name, version, status, watches FROM nudge.triggers;
SELECT count(*) AS versions FROM nudge.trigger_versions;

-- template syntax errors name the part and the line
SELECT nudge.define_template('t', 'Hello {{ profile.first_name', '<p>hi</p>');
SELECT nudge.define_template('t2', 'ok', E'<p>line one</p>\n<p>{% if x %}</p>\n<p>{{ x | }}</p>');
SELECT nudge.define_template('t2', 'ok', E'<p>line one</p>\n{% for x in y %}\n<p>never closed</p>');
SELECT name, subject FROM nudge.templates;

-- track with props that are not an object
SELECT nudge.track('u', 'cart_added', '[1]');
SELECT count(*) AS events FROM nudge.events;

-- unknown triggers
SELECT nudge.pause_trigger('nope');
SELECT nudge.drop_trigger('nope');
SELECT nudge.preview('nope', 'u');

-- profile query: must return email; a user it does not know fails that enrollment, not the pass
CREATE TABLE public.customers (id text PRIMARY KEY, mail text, first_name text, tz text);
INSERT INTO public.customers VALUES ('known', 'known@example.com', 'Kim', 'Europe/Paris');
SELECT nudge.set_profile_query('SELECT mail, first_name FROM public.customers WHERE id = $1');
SELECT nudge.set_profile_query('SELECT mail AS email, first_name FROM public.customrs WHERE id = $1');
SELECT nudge.set_profile_query('SELECT mail AS email, first_name, tz AS timezone FROM public.customers WHERE id = $1;');
SELECT nudge.track('known', 'cart_added', '{}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('stranger', 'cart_added', '{}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.preview('good', 'known');
SELECT nudge.preview('good', 'stranger');
SELECT nudge.run_due('2026-01-05 12:00+00') AS written;
SELECT user_id, state, reason LIKE 'message %' AS sent, CASE WHEN state = 'failed' THEN reason END AS failure
  FROM nudge.enrollments ORDER BY user_id;
SELECT user_id, recipient, subject FROM nudge.outbox;

-- a profile query that fails for one user fails that user's enrollment only
INSERT INTO public.customers VALUES ('fragile', 'fragile@example.com', 'Fay', 'UTC'), ('sturdy', 'sturdy@example.com', 'Sam', 'UTC');
SELECT nudge.set_profile_query($$SELECT mail AS email, first_name FROM public.customers
                                  WHERE id = $1 AND 1 / (CASE WHEN $1 = 'fragile' THEN 0 ELSE 1 END) = 1$$);
SELECT nudge.track(u, 'cart_added', '{}', '2026-01-06 10:00+00') > 0 AS tracked FROM unnest(ARRAY['fragile', 'sturdy']) u;
SELECT nudge.run_due('2026-01-06 12:00+00') AS written;
SELECT user_id, state, CASE WHEN state = 'failed' THEN reason END AS failure
  FROM nudge.enrollments WHERE user_id IN ('fragile', 'sturdy') ORDER BY user_id;
SELECT nudge.set_profile_query('SELECT mail AS email, first_name, tz AS timezone FROM public.customers WHERE id = $1');

-- a template that fails to render fails its enrollment only
SELECT nudge.define_template('broken', '{{ event.n | divided_by: 0 }}', 'x');
SELECT nudge.define_trigger('div', '{"on": {"event": "oops"}, "template": "broken"}');
SELECT nudge.track('known', 'oops', '{"n": 1}', '2026-01-05 10:00+00') > 0 AS tracked;
SELECT nudge.track('known', 'cart_added', '{}', '2026-01-05 11:30+00') > 0 AS tracked;
SELECT nudge.run_due('2026-01-05 13:00+00') AS written;
SELECT trigger, state, reason LIKE 'message %' AS sent, CASE WHEN state = 'failed' THEN reason END AS failure
  FROM nudge.enrollments WHERE user_id = 'known' ORDER BY entered_at;

-- a stored definition that no longer compiles (written by hand, or by an older
-- build) fails its own due enrollments, with a warning, and nothing else
SELECT nudge.track('known', 'cart_added', '{}', '2026-01-07 10:00+00') > 0 AS tracked;
SELECT nudge.track('known', 'oops', '{"n": 2}', '2026-01-07 10:00+00') > 0 AS tracked;
UPDATE nudge.trigger_versions SET definition = definition || '{"bogus": 1}' WHERE trigger = 'div';
SELECT nudge.run_due('2026-01-07 12:00+00') AS written;
SELECT trigger, state, reason LIKE 'message %' AS sent, CASE WHEN state = 'failed' THEN reason END AS failure
  FROM nudge.enrollments WHERE user_id = 'known' AND entered_at = '2026-01-07 10:00+00' ORDER BY trigger;

-- backtest refuses a bad definition as define_trigger does (22023, the JSON path)
DO $$ BEGIN
    PERFORM nudge.backtest('{"on": {"evnt": "x"}, "template": "t"}', now() - interval '1 day', now());
EXCEPTION WHEN invalid_parameter_value THEN RAISE NOTICE '22023: %', SQLERRM;
END $$;
