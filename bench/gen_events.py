#!/usr/bin/env python3
"""Writes the benchmark's event stream as CSV on stdout, the same every run.

    gen_events.py EVENTS USERS START_EPOCH SPAN_SECONDS [SEED]

Users are drawn from a Zipf distribution (s = 1.07: a few heavy shoppers, a
long tail) and each draw is one step of that user's session funnel, so that
carts are added after views and purchases close carts that exist:
view -> (cart add) -> (checkout) -> (purchase). Rows come out in time order,
the way an application appends them.
Columns: user_id, event, occurred_at (UTC), props (JSON).
"""
import bisect
import datetime
import itertools
import json
import random
import sys

n_events, n_users, start, span = (int(a) for a in sys.argv[1:5])
rng = random.Random(int(sys.argv[5]) if len(sys.argv) > 5 else 20261128)

weights = [1.0 / (rank ** 1.07) for rank in range(1, n_users + 1)]
cumulative = list(itertools.accumulate(weights))
total = cumulative[-1]
# shuffle which user id gets which rank, so heavy users are not u1, u2, ...
ids = list(range(1, n_users + 1))
rng.shuffle(ids)

# per user: the open cart (id, product, price) and how far its funnel went
carts = {}
cart_seq = 0
out = sys.stdout
write = out.write
step = span / n_events
for i in range(n_events):
    user = ids[bisect.bisect_left(cumulative, rng.random() * total)]
    at = start + i * step
    cart = carts.get(user)
    r = rng.random()
    if cart is None or cart[3] == 'viewed':
        product = rng.randrange(1, 500)
        if cart is not None and r < 0.30:
            cart_seq += 1
            cart = carts[user] = (f'k{cart_seq}', cart[1], cart[2], 'added')
            event, props = 'cart_added', {'cart_id': cart[0], 'product_id': cart[1], 'price': cart[2]}
        else:
            price = round(5 + rng.random() * 195, 2)
            carts[user] = (None, product, price, 'viewed')
            event, props = 'product_viewed', {'product_id': product, 'price': price}
    elif cart[3] == 'added':
        if r < 0.45:
            carts[user] = cart[:3] + ('checkout',)
            event, props = 'checkout_started', {'cart_id': cart[0]}
        elif r < 0.75:
            event, props = 'product_viewed', {'product_id': rng.randrange(1, 500), 'price': cart[2]}
        else:  # abandoned: the next session starts over
            del carts[user]
            event, props = 'product_viewed', {'product_id': rng.randrange(1, 500), 'price': cart[2]}
    else:  # checkout started
        if r < 0.6:
            event, props = 'purchased', {'cart_id': cart[0], 'total': cart[2]}
        else:
            event, props = 'product_viewed', {'product_id': rng.randrange(1, 500), 'price': cart[2]}
        del carts[user]
    stamp = datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat()
    write(f'u{user},{event},{stamp},"{json.dumps(props).replace(chr(34), chr(34) * 2)}"\n')
