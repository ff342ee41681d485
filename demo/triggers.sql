-- The case study's journeys, defined before the shop's data arrives.
\set ON_ERROR_STOP on

-- Orders are events: the app's own table, no copy.
SELECT nudge.add_source('app.orders', 'customer_id', time_column => 'created_at', event_name => 'purchased');
-- Recipients come straight from the app's customers table.
SELECT nudge.set_profile_query($$
    SELECT email, timezone, first_name, loyalty_tier FROM app.customers WHERE id = $1
$$);

SELECT nudge.define_template('cart_reminder',
  'Still thinking about the {{ event.product_name }}, {{ profile.first_name | default: "friend" }}?',
  '<h1>Your cart is waiting</h1>
<p>Hi {{ profile.first_name | default: "there" }}, you left the <b>{{ event.product_name }}</b>
(${{ event.price }}) in your cart.</p>
{% if profile.loyalty_tier == "gold" %}<p>As a gold member, shipping is on us.</p>{% endif %}
<p><a href="https://shop.example/cart/{{ event.cart_id }}">Return to your cart</a></p>',
  'Hi {{ profile.first_name | default: "there" }}, your {{ event.product_name }} is still in cart {{ event.cart_id }}.');

SELECT nudge.define_template('thanks_follow_up',
  'How are you liking your order, {{ profile.first_name | default: "friend" }}?',
  '<p>Thanks again for order #{{ event.id }} (${{ event.total }}). Tell us how it went?</p>
{% if context.history.orders > 1 %}<p>That was order number {{ context.history.orders }} with us: thank you for coming back.</p>{% endif %}');

SELECT nudge.define_template('browse_reminder',
  'The {{ event.product_name }} is still here',
  '<p>{{ profile.first_name | default: "Hi" }}, you were looking at the {{ event.product_name }}. It is still in stock.</p>');

-- Smart sending: at most one marketing email per customer per 16 hours; when
-- several are due within half an hour, the most important one goes.
SELECT nudge.configure('{"caps": [{"max": 1, "per": "16 hours"}], "arbitration_window": "30 minutes",
                         "unsubscribe_url": "https://mail.shop.example",
                         "unsubscribe_mailto": "unsubscribe@shop.example"}');

SELECT nudge.define_template('cart_reminder_short',
  'Your {{ event.product_name }} is waiting',
  '<p><a href="https://shop.example/cart/{{ event.cart_id }}">Finish your order</a></p>');

SELECT nudge.define_template('cart_nudge',
  'Anything we can help with, {{ profile.first_name | default: "friend" }}?',
  '<p>You took a look at our reminder about the {{ event.product_name }}. Questions about sizing or delivery? Just reply.</p>');

SELECT nudge.define_template('cart_discount',
  '10% off the {{ event.product_name }}, until Sunday',
  '<p>Your {{ event.product_name }} is still in cart {{ event.cart_id }}: use code COMEBACK10 for 10% off.</p>');

-- Abandoned cart as a journey of three emails that stops the moment the
-- cart is bought: a reminder after five minutes (two subject lines against
-- each other, and a 10% holdout to measure the uplift); three days later a
-- personal note to those who opened it, a discount to the others; a day
-- after that, the discount for whoever still has not bought.
SELECT nudge.define_trigger('cart_abandonment', '{
  "on":       {"event": "cart_added", "key": "cart_id"},
  "unless":   [{"event": "purchased", "same_key": true}],
  "priority": 10,
  "variants": [{"name": "friendly", "template": "cart_reminder"}, {"name": "short", "template": "cart_reminder_short"}],
  "holdout":  0.1,
  "goal":     {"event": "purchased", "within": "3 days", "value": "total"},
  "steps": [
    {"name": "reminder", "wait": "5 minutes", "template": "cart_reminder"},
    {"name": "nudge",    "wait": "3 days",    "template": "cart_nudge",
     "if": {"steps.reminder.opened": {"eq": true}}, "else": "discount"},
    {"name": "discount", "wait": "1 day",     "template": "cart_discount"}
  ]}');

-- Three days before a trial ends, at 09:00 in the customer's own time zone.
SELECT nudge.define_template('trial_ending',
  'Your trial ends {{ event.trial_ends_at | in_time_zone | date: "%A, %b %d" }}',
  '<p>{{ profile.first_name | default: "Hi" }}, your Trailhead+ trial ends on
{{ event.trial_ends_at | in_time_zone | date: "%A, %B %d at %H:%M" }}. Keep free shipping by subscribing.</p>');
SELECT nudge.define_trigger('trial_ending', '{
  "on":     {"event": "trial_started", "date": "trial_ends_at", "offset": "-3 days", "at": "09:00"},
  "unless": [{"event": "subscribed"}],
  "template": "trial_ending"}');

SELECT nudge.define_trigger('post_purchase', '{
  "on":       {"event": "purchased", "key": "cart_id"},
  "wait":     "48 hours",
  "priority": 5,
  "context":  {"history": "SELECT count(*) AS orders, sum(total) AS spent FROM app.orders WHERE customer_id = $1"},
  "quiet_hours": {"start": "21:00", "end": "08:00"},
  "template": "thanks_follow_up"}');

SELECT nudge.define_trigger('browse_abandonment', '{
  "on":       {"event": "product_viewed"},
  "wait":     "1 hour",
  "unless":   [{"event": "cart_added"}, {"event": "purchased"}],
  "reentry":  {"cooldown": "1 day"},
  "priority": 1,
  "quiet_hours": {"start": "21:00", "end": "08:00"},
  "template": "browse_reminder"}');
