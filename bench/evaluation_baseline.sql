-- What a user would schedule with pg_cron instead: the same selection (due,
-- not bought within the 30 minutes, opted in, not sent before), unrendered
-- subject and body.
\set ON_ERROR_STOP on
INSERT INTO bench.hand_outbox (user_id, cart_id, recipient, subject, html)
SELECT c.user_id, c.props->>'cart_id', p.email, 'Still thinking about product ' || (c.props->>'product_id'),
       'product ' || (c.props->>'product_id') || ' is in cart ' || (c.props->>'cart_id')
  FROM bench.events c
  JOIN bench.customers p ON p.id = c.user_id
 WHERE c.event = 'cart_added' AND c.occurred_at <= now() - interval '30 minutes'
   AND p.opted_in
   AND NOT EXISTS (SELECT 1 FROM bench.events x
                    WHERE x.user_id = c.user_id AND x.occurred_at >= c.occurred_at
                      AND x.occurred_at < c.occurred_at + interval '30 minutes'
                      AND x.event = 'purchased' AND x.props->>'cart_id' = c.props->>'cart_id')
   AND NOT EXISTS (SELECT 1 FROM bench.hand_outbox o WHERE o.user_id = c.user_id AND o.cart_id = c.props->>'cart_id');
