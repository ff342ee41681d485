-- SQL-facing pieces that are plain SQL: wrappers for regclass arguments,
-- catalog reads, and the registration of nudge.events as the first source.

-- Event names any trigger reads; the capture trigger drops every other event
-- before it crosses into Rust, so unwatched events cost almost nothing.
CREATE FUNCTION nudge._watched_events() RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT w), '{}') FROM nudge.triggers, unnest(watches) AS w
$$;

CREATE FUNCTION nudge.add_source(
    source regclass,
    user_column text,
    event_column text DEFAULT NULL,
    time_column text DEFAULT NULL,
    props_column text DEFAULT NULL,
    event_name text DEFAULT NULL
) RETURNS void LANGUAGE sql AS $$
    SELECT nudge._add_source(source::oid, user_column, event_column, time_column, props_column, event_name)
$$;

CREATE FUNCTION nudge.drop_source(source regclass) RETURNS void
LANGUAGE sql AS $$ SELECT nudge._drop_source(source::oid) $$;

CREATE FUNCTION nudge.explain(trigger text, user_id text)
RETURNS TABLE (at timestamptz, step text, detail text)
LANGUAGE sql STABLE AS $$
    SELECT j.at, j.step, j.detail
      FROM nudge.journal j
     WHERE j.trigger = explain.trigger AND j.user_id = explain.user_id
     ORDER BY j.at, j.id
$$;

SELECT nudge.set_profile_query(NULL);
SELECT nudge.add_source('nudge.events', 'user_id', 'event', 'occurred_at', 'props');
