-- latency: each ping is its own user, so its message is found by user_id
INSERT INTO bench.events (user_id, event, occurred_at, props)
VALUES ('p' || nextval('bench.pings'), 'ping', now(), '{"n": 1}');
