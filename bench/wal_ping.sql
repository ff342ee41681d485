-- WAL capture lag: each event its own journey (key n), so that an enrollment
-- is found by its event
\set u random(1, 100000)
\set n random(1, 2000000000)
INSERT INTO bench.events (user_id, event, occurred_at, props)
VALUES ('u' || :u, 'wping', now(), jsonb_build_object('n', :n::text));
