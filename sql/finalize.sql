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

-- Roles (DESIGN.md, Security model): each gets what it needs and no more.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_admin') THEN
        CREATE ROLE nudge_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_writer') THEN
        CREATE ROLE nudge_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nudge_mailer') THEN
        CREATE ROLE nudge_mailer NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA nudge FROM PUBLIC;
GRANT USAGE ON SCHEMA nudge TO nudge_admin, nudge_writer, nudge_mailer;

-- nudge_admin: defines triggers, templates, sources and the profile query; reads everything.
GRANT ALL ON ALL TABLES IN SCHEMA nudge TO nudge_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA nudge TO nudge_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA nudge TO nudge_admin;
GRANT CREATE ON SCHEMA nudge TO nudge_admin;  -- add_source writes capture functions here

-- nudge_writer: tracks events (nudge.track, or INSERT / COPY into nudge.events).
GRANT EXECUTE ON FUNCTION nudge.track(text, text, jsonb, timestamptz) TO nudge_writer;
GRANT INSERT ON nudge.events TO nudge_writer;
GRANT SELECT (id) ON nudge.events TO nudge_writer;  -- track's INSERT ... RETURNING id

-- nudge_mailer: claims, acks, fails, records engagement, reads the outbox.
GRANT SELECT ON nudge.outbox TO nudge_mailer;
GRANT EXECUTE ON FUNCTION
    nudge.claim(int, interval, text),
    nudge.ack(bigint, text),
    nudge.fail(bigint, text, boolean),
    nudge.release(bigint[]),
    nudge.record_engagement(text, text, timestamptz, jsonb),
    nudge.outbox_metrics()
TO nudge_mailer;
