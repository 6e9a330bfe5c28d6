-- MARTS: recomputed from STAGING for the keys a batch touched, so late or repeated rows give the same result.
CREATE SCHEMA IF NOT EXISTS {marts};

-- SCD Type 2 over the user attributes carried on events. A new version starts at the event time where the hash
-- of the tracked columns (USER_TIER, USER_COUNTRY) changes; the previous version ends there.
CREATE TABLE IF NOT EXISTS {marts}.DIM_USERS (
    USER_KEY VARCHAR NOT NULL,           -- surrogate: MD5(USER_ID || '|' || first EVENT_ID of the version)
    USER_ID VARCHAR NOT NULL,
    USER_TIER VARCHAR,                   -- tracked
    USER_COUNTRY VARCHAR,                -- tracked
    USER_CITY VARCHAR,                   -- as on the version's first event
    USER_REGISTRATION_DATE DATE,
    USER_EMAIL_HASH VARCHAR,
    ATTRIBUTES_HASH VARCHAR NOT NULL,    -- MD5 of the tracked columns (null as '~'), '|'-separated
    VALID_FROM TIMESTAMP_NTZ NOT NULL,   -- event time of the first event with these attributes
    VALID_TO TIMESTAMP_NTZ,              -- VALID_FROM of the next version; null for the current one
    IS_CURRENT BOOLEAN NOT NULL
);

CREATE TABLE IF NOT EXISTS {marts}.USER_SESSIONS (
    SESSION_ID VARCHAR NOT NULL,
    USER_ID VARCHAR NOT NULL,
    SESSION_DATE DATE NOT NULL,          -- UTC day the session started
    SESSION_START TIMESTAMP_NTZ NOT NULL,
    SESSION_END TIMESTAMP_NTZ NOT NULL,
    DURATION_S NUMBER(18, 0) NOT NULL,
    EVENTS NUMBER(18, 0) NOT NULL,       -- activity
    PAGE_VIEWS NUMBER(18, 0) NOT NULL,
    PRODUCT_VIEWS NUMBER(18, 0) NOT NULL,
    ADD_TO_CARTS NUMBER(18, 0) NOT NULL,
    PURCHASES NUMBER(18, 0) NOT NULL,
    REVENUE NUMBER(18, 2) NOT NULL,      -- spend: sum of AMOUNT of the purchases
    CONVERTED BOOLEAN NOT NULL           -- at least one purchase
);

CREATE TABLE IF NOT EXISTS {marts}.DAILY_METRICS (
    METRIC_DATE DATE NOT NULL,           -- UTC day of the events
    EVENTS NUMBER(18, 0) NOT NULL,
    ACTIVE_USERS NUMBER(18, 0) NOT NULL,
    SESSIONS NUMBER(18, 0) NOT NULL,     -- traffic: sessions with an event that day
    PAGE_VIEWS NUMBER(18, 0) NOT NULL,
    PRODUCT_VIEWS NUMBER(18, 0) NOT NULL,
    ADD_TO_CARTS NUMBER(18, 0) NOT NULL,
    PURCHASES NUMBER(18, 0) NOT NULL,
    REVENUE NUMBER(18, 2) NOT NULL,
    VIEWING_SESSIONS NUMBER(18, 0) NOT NULL,     -- sessions with a product_view that day
    CART_SESSIONS NUMBER(18, 0) NOT NULL,        -- ... with an add_to_cart
    PURCHASING_SESSIONS NUMBER(18, 0) NOT NULL,  -- ... with a purchase
    SESSION_TO_PURCHASE_RATE NUMBER(9, 4),       -- PURCHASING_SESSIONS / SESSIONS (null when 0 sessions)
    VIEW_TO_CART_RATE NUMBER(9, 4),              -- CART_SESSIONS / VIEWING_SESSIONS
    CART_TO_PURCHASE_RATE NUMBER(9, 4)           -- PURCHASING_SESSIONS / CART_SESSIONS
);

-- One row per transaction: its latest state, and its first status.
CREATE TABLE IF NOT EXISTS {marts}.FACT_TRANSACTIONS (
    TRANSACTION_ID VARCHAR NOT NULL,
    USER_ID VARCHAR,
    PRODUCT_ID VARCHAR,
    QUANTITY NUMBER(10, 0),
    UNIT_PRICE NUMBER(12, 2),
    DISCOUNT NUMBER(12, 2),
    TAX NUMBER(12, 2),
    TOTAL NUMBER(12, 2),
    PAYMENT_METHOD VARCHAR,
    INITIAL_STATUS VARCHAR,              -- status of the first change (by SOURCE_LSN, then CHANGED_AT)
    CURRENT_STATUS VARCHAR,              -- status of the last change
    IS_DELETED BOOLEAN NOT NULL,         -- the last change is a delete (op d)
    CREATED_AT TIMESTAMP_NTZ,
    UPDATED_AT TIMESTAMP_NTZ,
    FIRST_CHANGED_AT TIMESTAMP_NTZ NOT NULL,
    LAST_CHANGED_AT TIMESTAMP_NTZ NOT NULL,
    CHANGE_COUNT NUMBER(18, 0) NOT NULL,
    LAST_SOURCE_LSN NUMBER(19, 0)
);

-- One row per change that set a new status (the first change, every status change, and the delete).
CREATE TABLE IF NOT EXISTS {marts}.FACT_TRANSACTION_STATUS_HISTORY (
    TRANSACTION_ID VARCHAR NOT NULL,
    CHANGE_KEY VARCHAR NOT NULL,
    SOURCE_LSN NUMBER(19, 0),
    OP VARCHAR NOT NULL,
    STATUS VARCHAR,
    PREVIOUS_STATUS VARCHAR,
    VALID_FROM TIMESTAMP_NTZ NOT NULL,   -- CHANGED_AT of the change
    VALID_TO TIMESTAMP_NTZ,              -- VALID_FROM of the next row; null for the latest
    IS_CURRENT BOOLEAN NOT NULL
);
