-- The cart journey goes on, and the trials come to their end: some
-- customers open their reminder, then the clock runs four days ahead.
\set ON_ERROR_STOP on
\pset footer off

\echo '== Two in five customers open their cart reminder (a mail client''s pixel, through the gateway, would record it) =='
SELECT count(nudge.record_engagement(o.message_key, 'opened', o.scheduled_at + interval '10 minutes')) AS opened
  FROM nudge.outbox o
  JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
 WHERE o.trigger = 'cart_abandonment' AND e.step = 0 AND o.status = 'sent' AND abs(hashtext(o.user_id)) % 5 < 2;

\echo '== Eight days later: run_due as the worker would, six hours at a time =='
SELECT sum(nudge.run_due(now() + k * interval '6 hours', 100000)) AS messages_written
  FROM generate_series(1, 33) k;

\echo '== The cart journey, step by step (nudge: to those who opened; discount: to the others, and to all who still had not bought) =='
SELECT step, arm, entered, sent, skipped, exited, suppressed, held_out, opened, converted
  FROM nudge.trigger_stats WHERE trigger = 'cart_abandonment';

\echo '== One customer who opened the reminder, explained =='
SELECT e.user_id AS "customer" FROM nudge.enrollments e
 WHERE e.trigger = 'cart_abandonment' AND e.step = 1 AND e.state = 'sent'
 ORDER BY e.user_id LIMIT 1 \gset
SELECT at, step, regexp_replace(detail, 'nm_[0-9a-f]+', 'nm_…') AS detail, rule
  FROM nudge.explain('cart_abandonment', :'customer');

\echo '== Trials ending: three days before, at 09:00 where each customer lives =='
SELECT DISTINCT ON (c.timezone) e.user_id AS customer, c.timezone,
       to_char(e.due_at AT TIME ZONE c.timezone, 'Dy DD Mon HH24:MI') AS local_time,
       to_char(e.due_at AT TIME ZONE 'UTC', 'DD Mon HH24:MI') || ' UTC' AS utc, o.subject
  FROM nudge.enrollments e
  JOIN app.customers c ON c.id = e.user_id
  LEFT JOIN nudge.outbox o ON o.user_id = e.user_id AND o.enrollment_id = e.id
 WHERE e.trigger = 'trial_ending'
 ORDER BY c.timezone, e.due_at;
