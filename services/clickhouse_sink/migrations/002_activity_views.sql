-- The seed design's materialized views over user_events_realtime, fed block by block at insert time.
-- A replayed batch carries the same deduplication token, and deduplicate_blocks_in_dependent_materialized_views
-- (set on every insert) makes the views skip it too, so their sums stay exact across crashes and replays.
-- Unlike the seed, unique_sessions is an aggregate state: summing per-block distinct counts would overcount.

CREATE TABLE IF NOT EXISTS {db}.user_activity_summary {on_cluster}
(
    date            Date32,
    user_id         UUID,
    event_type      LowCardinality(String),
    event_count     SimpleAggregateFunction(sum, UInt64),
    unique_sessions AggregateFunction(uniq, Nullable(UUID))
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(date)
ORDER BY (date, user_id, event_type)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.user_activity_summary_mv {on_cluster}
TO {db}.user_activity_summary AS
SELECT
    toDate32(event_time) AS date,
    user_id,
    event_type,
    count() AS event_count,
    uniqState(session_id) AS unique_sessions
FROM {db}.user_events_realtime
GROUP BY date, user_id, event_type;

-- Conversion funnel per user and day: page_view -> product_view -> add_to_cart -> checkout_start -> purchase.
CREATE TABLE IF NOT EXISTS {db}.conversion_funnel {on_cluster}
(
    date            Date32,
    user_id         UUID,
    page_views      UInt64,
    product_views   UInt64,
    add_to_carts    UInt64,
    checkout_starts UInt64,
    purchases       UInt64
)
ENGINE = {replicated}SummingMergeTree
PARTITION BY toYYYYMM(date)
ORDER BY (date, user_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.conversion_funnel_mv {on_cluster}
TO {db}.conversion_funnel AS
SELECT
    toDate32(event_time) AS date,
    user_id,
    countIf(event_type = 'page_view') AS page_views,
    countIf(event_type = 'product_view') AS product_views,
    countIf(event_type = 'add_to_cart') AS add_to_carts,
    countIf(event_type = 'checkout_start') AS checkout_starts,
    countIf(event_type = 'purchase') AS purchases
FROM {db}.user_events_realtime
GROUP BY date, user_id;
