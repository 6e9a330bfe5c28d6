-- Control schema: what was loaded (LOADS, one row per committed batch) and what is half-done (PENDING: a batch
-- copied into RAW whose MERGE has not committed yet; the next run deletes its RAW rows and loads again).
CREATE SCHEMA IF NOT EXISTS {control};

CREATE TABLE IF NOT EXISTS {control}.LOADS (
    TABLE_NAME VARCHAR NOT NULL,         -- lake table: user_events or transactions
    BATCH_ID VARCHAR NOT NULL,           -- <table>-<snapshot id>: the same rows always get the same id
    SNAPSHOT_ID NUMBER(38, 0) NOT NULL,  -- Iceberg snapshot the batch was read from (the last loaded snapshot)
    OFFSETS VARCHAR NOT NULL,            -- lp.offsets of that snapshot: {"topic:partition": next offset}
    FROM_OFFSETS VARCHAR,                -- the offsets the batch started from (null: the whole table was read)
    ROWS_LOADED NUMBER(18, 0) NOT NULL,  -- rows copied into RAW for this batch
    LOADED_AT TIMESTAMP_NTZ NOT NULL     -- UTC time of the commit
);

CREATE TABLE IF NOT EXISTS {control}.PENDING (
    TABLE_NAME VARCHAR NOT NULL,
    BATCH_ID VARCHAR NOT NULL,
    STAGED_AT TIMESTAMP_NTZ NOT NULL
);
