-- The speed layer's base tables: one row per processed event / per transaction change.
-- Placeholders: {db} the database, {on_cluster} "ON CLUSTER '<name>'" or nothing, {replicated} "Replicated" or
-- nothing (CLICKHOUSE_CLUSTER set: ReplicatedReplacingMergeTree with the server's default replica path).
--
-- Exactly once: one insert carries the batches of several partitions (one per partition, each an offset range)
-- with insert_deduplication_token = kafka_insert, a digest of "<topic>@<id>:<partition>:<first>-<last>" of
-- each; non_replicated_deduplication_window makes a single (non-replicated) engine remember the last 10,000
-- tokens as ReplicatedMergeTree does. kafka_topic_id / kafka_partition / kafka_batch_last / kafka_insert record
-- which batch and which insert a row came in with, so a restarted sink re-forms the inserts it made but did
-- not commit to Kafka (same token: ignored by the table and, with deduplicate_blocks_in_dependent_materialized
-- _views, by every view). The topic id (Kafka's, new for a re-created topic) keeps a topic whose offsets
-- restarted at 0 -- the local broker keeps topics in memory -- from being mistaken for the old one.
-- Second line: ReplacingMergeTree collapses rows with the same sorting key (event_id within its hour) on merge;
-- queries that must be exact read with FINAL or count uniqExact(event_id).

CREATE TABLE IF NOT EXISTS {db}.user_events_realtime {on_cluster}
(
    event_id               UUID,
    event_type             LowCardinality(String),
    event_time             DateTime64(3, 'UTC'),
    user_id                UUID,
    session_id             Nullable(UUID),
    product_id             Nullable(String),
    transaction_id         Nullable(UUID),
    quantity               Nullable(Int32),
    price                  Nullable(Float64),
    amount                 Nullable(Float64),
    search_query           Nullable(String),
    page_url               Nullable(String),
    referrer               Nullable(String),
    device_type            LowCardinality(Nullable(String)),
    ip_address             Nullable(IPv4),
    country                LowCardinality(Nullable(String)),
    source                 LowCardinality(String),
    properties             Map(String, String),
    user_tier              LowCardinality(Nullable(String)),
    user_country           LowCardinality(Nullable(String)),
    user_city              Nullable(String),
    user_registration_date Nullable(Date32),
    user_email_hash        Nullable(String),
    product_name           Nullable(String),
    product_category       LowCardinality(Nullable(String)),
    product_subcategory    LowCardinality(Nullable(String)),
    product_brand          LowCardinality(Nullable(String)),
    product_price          Nullable(Float64),
    event_date             Date32,
    event_hour             UInt8,
    day_of_week            UInt8,
    is_weekend             Bool,
    quality_flags          Array(LowCardinality(String)),
    validated_at           DateTime64(3, 'UTC'),
    rules_version          LowCardinality(String),
    kafka_topic_id        LowCardinality(String),
    kafka_insert          LowCardinality(String),
    kafka_partition        UInt32,
    kafka_offset           UInt64,
    kafka_batch_last       UInt64,
    inserted_at            DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX kafka_batch kafka_batch_last TYPE minmax GRANULARITY 1
)
ENGINE = {replicated}ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (toStartOfHour(event_time), event_id)
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 10000;

-- One row per change of an OLTP transaction; FINAL gives the current state (the highest source_lsn wins, a
-- delete hides the row). Not partitioned: a delete must meet the row it deletes, whatever its created_at.
CREATE TABLE IF NOT EXISTS {db}.transactions_realtime {on_cluster}
(
    transaction_id   UUID,
    user_id          Nullable(UUID),
    product_id       Nullable(UUID),
    quantity         Nullable(Int32),
    unit_price       Nullable(Decimal(12, 2)),
    discount         Nullable(Decimal(12, 2)),
    tax              Nullable(Decimal(12, 2)),
    total            Nullable(Decimal(12, 2)),
    payment_method   LowCardinality(Nullable(String)),
    shipping_address Nullable(String),
    status           LowCardinality(Nullable(String)),
    created_at       Nullable(DateTime64(6, 'UTC')),
    updated_at       Nullable(DateTime64(6, 'UTC')),
    op               LowCardinality(String),
    source_lsn       Nullable(Int64),
    changed_at       DateTime64(3, 'UTC'),
    quality_flags    Array(LowCardinality(String)),
    validated_at     DateTime64(3, 'UTC'),
    rules_version    LowCardinality(String),
    version          UInt64,
    is_deleted       UInt8,
    kafka_topic_id   LowCardinality(String),
    kafka_insert     LowCardinality(String),
    kafka_partition  UInt32,
    kafka_offset     UInt64,
    kafka_batch_last UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX kafka_batch kafka_batch_last TYPE minmax GRANULARITY 1
)
ENGINE = {replicated}ReplacingMergeTree(version, is_deleted)
ORDER BY transaction_id
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 10000;
