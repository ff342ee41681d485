\set ON_ERROR_STOP on
\pset footer off
\echo
\echo '== What each trigger did =='
SELECT trigger,
       count(*)                                   AS entered,
       count(*) FILTER (WHERE state = 'exited')   AS exited,
       count(*) FILTER (WHERE state = 'waiting')  AS waiting,
       count(*) FILTER (WHERE state = 'sent')     AS sent,
       count(*) FILTER (WHERE state = 'held_out') AS held_out,
       count(*) FILTER (WHERE state = 'suppressed') AS suppressed,
       count(*) FILTER (WHERE state = 'failed')   AS failed,
       sum(coalesced)                             AS coalesced_entries
  FROM nudge.enrollments GROUP BY trigger ORDER BY trigger;

\echo '== Why journeys ended without a message, or went later =='
SELECT trigger, state,
       regexp_replace(regexp_replace(regexp_replace(reason, 'nm_[0-9a-f]+', 'nm_…', 'g'),
                                     'deferred to .* by', 'deferred to the next allowed local minute by'),
                      ', key "[^"]*"', '') AS reason,
       count(*)
  FROM nudge.enrollments
 WHERE state IN ('exited', 'failed', 'suppressed') OR reason LIKE '%deferred%'
 GROUP BY 1, 2, 3 ORDER BY 1, 4 DESC;

\echo '== The outbox after delivery (pending: held by quiet hours until the recipient''s morning) =='
SELECT * FROM nudge.outbox_metrics();

\echo '== A few messages from the outbox =='
\x on
SELECT DISTINCT ON (trigger) trigger, recipient, subject, html, message_key, status, sent_at
  FROM nudge.outbox ORDER BY trigger, id;
\x off

\echo '== Does it work? Cart reminders (the journey''s first step) by arm, against the holdout =='
SELECT arm, entered, held_out, sent, converted, round(conversion_rate::numeric, 3) AS conv_rate, revenue,
       round(uplift::numeric, 3) AS uplift, round(uplift_ci_low::numeric, 3) AS ci_low,
       round(uplift_ci_high::numeric, 3) AS ci_high, round(p_value::numeric, 3) AS p_value
  FROM nudge.trigger_stats WHERE trigger = 'cart_abandonment' AND step = 'reminder' ORDER BY arm;

\echo '== One customer, explained =='
SELECT user_id AS "customer" FROM nudge.outbox WHERE trigger = 'cart_abandonment' ORDER BY id LIMIT 1 \gset
SELECT * FROM nudge.explain('cart_abandonment', :'customer');
