-- A small e-commerce shop: customers, products and orders in its own schema
-- `app`. Fixed seed, so
-- every run builds the same shop (relative to now()).
\set ON_ERROR_STOP on
SET max_parallel_workers_per_gather = 0;  -- one random() sequence, one data set
SELECT setseed(0.42);

CREATE SCHEMA app;
CREATE TABLE app.customers (
    id           text PRIMARY KEY,
    email        text NOT NULL,
    first_name   text,
    timezone     text,
    loyalty_tier text
);
CREATE TABLE app.products (id int PRIMARY KEY, name text, price numeric(8,2));
CREATE TABLE app.orders (
    id          bigserial PRIMARY KEY,
    customer_id text NOT NULL,
    cart_id     text NOT NULL,
    total       numeric(10,2) NOT NULL,
    created_at  timestamptz NOT NULL
);

INSERT INTO app.products
SELECT i, (ARRAY['Trail', 'City', 'Summit', 'Harbor', 'Meadow', 'Canyon'])[1 + (i % 6)] || ' ' ||
          (ARRAY['Boots', 'Jacket', 'Backpack', 'Scarf', 'Sneakers', 'Beanie', 'Gloves'])[1 + (i % 7)],
       round((15 + random() * 185)::numeric, 2)
  FROM generate_series(1, 40) i;

INSERT INTO app.customers
SELECT 'c' || i,
       'customer' || i || '@example.com',
       CASE WHEN random() < 0.85
            THEN (ARRAY['Ada', 'Bruno', 'Chloe', 'Dmitri', 'Elena', 'Farah', 'Goran', 'Hana', 'Ivo', 'Jade',
                        'Kofi', 'Lena', 'Mateo', 'Nina', 'Omar', 'Priya', 'Quinn', 'Rosa', 'Sven', 'Tomas'])[1 + floor(random() * 20)::int]
       END,  -- some customers never told us their name
       (ARRAY['America/New_York', 'America/Chicago', 'America/Los_Angeles', 'Europe/London', 'Europe/Berlin',
              'Europe/Madrid', 'Asia/Tokyo', 'Australia/Sydney'])[1 + floor(random() * 8)::int],
       (ARRAY['bronze', 'bronze', 'bronze', 'silver', 'silver', 'gold'])[1 + floor(random() * 6)::int]
  FROM generate_series(1, 3000) i;

