-- Event-time windowed KPIs (tumbling windows on event_time, not on arrival): orders and revenue per minute,
-- per product category per 5 minutes, per product per 15 minutes (for "top products").
--
-- Plain views, computed when read, over user_events_realtime FINAL: exact whatever happened upstream (FINAL
-- collapses any duplicate event_id the tokens did not catch), and free at insert time. Materialized, each
-- would add a part and an aggregation to every insert (measured here: ~25 ms per view per insert, the
-- largest share of a small insert); their windows are minutes wide, so reading them scans little: the
-- sorting key starts with the event hour, and a filter on the window is pushed down to event_time.

CREATE VIEW IF NOT EXISTS {db}.orders_per_minute {on_cluster} AS
SELECT
    toStartOfMinute(event_time) AS minute,
    count() AS orders,
    sum(toUInt64(greatest(ifNull(quantity, 0), 0))) AS items,
    sum(ifNull(amount, 0)) AS revenue
FROM {db}.user_events_realtime FINAL
WHERE event_type = 'purchase'
GROUP BY minute;

CREATE VIEW IF NOT EXISTS {db}.category_sales_5m {on_cluster} AS
SELECT
    toStartOfFiveMinutes(event_time) AS window_start,
    ifNull(toString(product_category), 'unknown') AS category,
    count() AS orders,
    sum(toUInt64(greatest(ifNull(quantity, 0), 0))) AS items,
    sum(ifNull(amount, 0)) AS revenue
FROM {db}.user_events_realtime FINAL
WHERE event_type = 'purchase'
GROUP BY window_start, category;

CREATE VIEW IF NOT EXISTS {db}.product_sales_15m {on_cluster} AS
SELECT
    toStartOfFifteenMinutes(event_time) AS window_start,
    assumeNotNull(product_id) AS product_id,
    anyLast(product_name) AS product_name,
    anyLast(toString(product_category)) AS category,
    countIf(event_type = 'product_view') AS views,
    countIf(event_type = 'add_to_cart') AS add_to_carts,
    countIf(event_type = 'purchase') AS orders,
    sumIf(toUInt64(greatest(ifNull(quantity, 0), 0)), event_type = 'purchase') AS units,
    sumIf(ifNull(amount, 0), event_type = 'purchase') AS revenue
FROM {db}.user_events_realtime FINAL
WHERE product_id IS NOT NULL AND event_type IN ('product_view', 'add_to_cart', 'purchase')
GROUP BY window_start, product_id;
