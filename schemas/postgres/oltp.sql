-- OLTP schema written by the generator and captured by Debezium (CDC).
-- Idempotent: safe to apply on every generator start.

CREATE TABLE IF NOT EXISTS users (
    user_id           uuid        PRIMARY KEY,
    email             text        NOT NULL,
    first_name        text        NOT NULL,
    last_name         text        NOT NULL,
    tier              text        NOT NULL CHECK (tier IN ('bronze', 'silver', 'gold', 'platinum')),
    country           char(2)     NOT NULL,
    city              text        NOT NULL,
    registration_date date        NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS products (
    product_id  uuid          PRIMARY KEY,
    name        text          NOT NULL,
    category    text          NOT NULL,
    subcategory text          NOT NULL,
    brand       text          NOT NULL,
    price       numeric(10,2) NOT NULL CHECK (price > 0),
    cost        numeric(10,2) NOT NULL CHECK (cost >= 0 AND cost < price),
    created_at  timestamptz   NOT NULL,
    updated_at  timestamptz   NOT NULL
);

CREATE TABLE IF NOT EXISTS transactions (
    transaction_id   uuid          PRIMARY KEY,
    user_id          uuid          NOT NULL REFERENCES users (user_id),
    product_id       uuid          NOT NULL REFERENCES products (product_id),
    quantity         integer       NOT NULL CHECK (quantity > 0),
    unit_price       numeric(10,2) NOT NULL CHECK (unit_price >= 0),
    discount         numeric(10,2) NOT NULL DEFAULT 0 CHECK (discount >= 0),
    tax              numeric(10,2) NOT NULL DEFAULT 0 CHECK (tax >= 0),
    total            numeric(12,2) NOT NULL CHECK (total >= 0),
    payment_method   text          NOT NULL,
    shipping_address text          NOT NULL,
    status           text          NOT NULL DEFAULT 'created'
                     CHECK (status IN ('created', 'paid', 'shipped', 'delivered', 'cancelled')),
    created_at       timestamptz   NOT NULL,
    updated_at       timestamptz   NOT NULL
);

-- Foreign keys are not indexed by PostgreSQL itself; per-user/product lookups and joins need these.
CREATE INDEX IF NOT EXISTS transactions_user_id_idx    ON transactions (user_id);
CREATE INDEX IF NOT EXISTS transactions_product_id_idx ON transactions (product_id);
CREATE INDEX IF NOT EXISTS transactions_created_at_idx ON transactions (created_at);
-- Only open orders are looked up by status; finished ones (the large majority) stay out of the index.
CREATE INDEX IF NOT EXISTS transactions_open_status_idx ON transactions (status)
    WHERE status IN ('created', 'paid', 'shipped');
CREATE INDEX IF NOT EXISTS users_email_idx       ON users (email);
CREATE INDEX IF NOT EXISTS users_tier_idx        ON users (tier);
CREATE INDEX IF NOT EXISTS products_category_idx ON products (category, subcategory);

-- Debezium needs the full old row on UPDATE/DELETE, not just the key.
ALTER TABLE users        REPLICA IDENTITY FULL;
ALTER TABLE products     REPLICA IDENTITY FULL;
ALTER TABLE transactions REPLICA IDENTITY FULL;
