-- latency: each ping is a user's only ping, so its message is found by user_id
INSERT INTO bench.events (user_id, event, occurred_at, props)
VALUES ('u' || nextval('bench.pings'), 'ping', now(), '{"n": 1}');
