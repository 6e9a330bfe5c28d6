"""The live views, as named read-only queries (the query command and the sink's /query endpoint).

All windows are on event time. The aggregate tables are summed at read time (`sum() ... GROUP BY`), because
Summing/AggregatingMergeTree fold the rows of one key only when they merge parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Rows = Callable[[str], list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Result:
    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "columns": self.columns, "rows": self.rows}


FUNNEL_STEPS = ("page_views", "product_views", "add_to_carts", "checkout_starts", "purchases")
_FUNNEL_TYPES = "('page_view', 'product_view', 'add_to_cart', 'checkout_start', 'purchase')"


def funnel(rows: Rows, db: str) -> Result:
    """Today's conversion funnel (UTC): events per step and users who reached it, and step-to-step conversion."""
    sums = ", ".join(f"sum({step}) AS {step}" for step in FUNNEL_STEPS)
    users = ", ".join(f"countIf({step} > 0)" for step in FUNNEL_STEPS)
    events = ", ".join(f"sum({step})" for step in FUNNEL_STEPS)
    sql = (
        f"SELECT {events}, {users} FROM (SELECT user_id, {sums} FROM {db}.conversion_funnel "
        "WHERE date = today() GROUP BY user_id)"
    )
    (row,) = rows(sql) or [(0,) * (2 * len(FUNNEL_STEPS))]
    out, previous = [], None
    for index, step in enumerate(FUNNEL_STEPS):
        count, reached = int(row[index] or 0), int(row[len(FUNNEL_STEPS) + index] or 0)
        rate = round(100 * reached / previous, 1) if previous else None
        out.append([step.removesuffix("s").replace("_", " "), count, reached, rate])
        previous = reached
    return Result("funnel", "Conversion funnel today (UTC)", ["step", "events", "users", "% of previous step"], out)


def revenue(rows: Rows, db: str) -> Result:
    """Orders, items and revenue per minute of event time over the last 15 minutes, and their total."""
    sql = (
        f"SELECT minute, sum(orders), sum(items), round(sum(revenue), 2) FROM {db}.orders_per_minute "
        "WHERE minute >= toStartOfMinute(now() - INTERVAL 15 MINUTE) GROUP BY minute ORDER BY minute"
    )
    out = [[str(minute), int(orders), int(items), float(rev)] for minute, orders, items, rev in rows(sql)]
    total = ["total", sum(r[1] for r in out), sum(r[2] for r in out), round(sum(r[3] for r in out), 2)]
    return Result("revenue", "Revenue, last 15 minutes", ["minute (UTC)", "orders", "items", "revenue"], [*out, total])


def top_products(rows: Rows, db: str, limit: int = 5) -> Result:
    """Per 15-minute window (the current and the previous one): the products with the most revenue."""
    sql = (
        "SELECT window_start, product_id, any(product_name), any(category), sum(views), sum(add_to_carts), "
        f"sum(orders), sum(units), round(sum(revenue), 2) AS rev FROM {db}.product_sales_15m "
        "WHERE window_start >= toStartOfFifteenMinutes(now()) - INTERVAL 15 MINUTE "
        f"GROUP BY window_start, product_id ORDER BY window_start DESC, rev DESC, sum(views) DESC "
        f"LIMIT {int(limit)} BY window_start"
    )
    out = [[str(r[0]), r[1], r[2], r[3], *(int(v) for v in r[4:8]), float(r[8])] for r in rows(sql)]
    columns = ["window (UTC)", "product_id", "name", "category", "views", "carts", "orders", "units", "revenue"]
    return Result("top-products", "Top products per 15 minutes", columns, out)


def categories(rows: Rows, db: str) -> Result:
    """Orders and revenue per product category per 5 minutes, last 30 minutes."""
    sql = (
        f"SELECT window_start, category, sum(orders), sum(items), round(sum(revenue), 2) FROM {db}.category_sales_5m "
        "WHERE window_start >= toStartOfFiveMinutes(now()) - INTERVAL 25 MINUTE "
        "GROUP BY window_start, category ORDER BY window_start DESC, sum(revenue) DESC"
    )
    out = [[str(r[0]), r[1], int(r[2]), int(r[3]), float(r[4])] for r in rows(sql)]
    return Result(
        "categories",
        "Sales per category per 5 minutes",
        ["window (UTC)", "category", "orders", "items", "revenue"],
        out,
    )


def counts(rows: Rows, db: str) -> Result:
    """Rows per table, and the exact figures: distinct keys, duplicates, the current transactions."""
    out: list[list[Any]] = [
        [str(name), int(total or 0)]
        for name, total in rows(
            f"SELECT name, total_rows FROM system.tables WHERE database = '{db}' AND engine LIKE '%MergeTree' "
            "AND name != 'schema_migrations' ORDER BY name"
        )
    ]
    ((events, distinct_events),) = rows(f"SELECT count(), uniqExact(event_id) FROM {db}.user_events_realtime")
    ((changes, transactions),) = rows(f"SELECT count(), uniqExact(transaction_id) FROM {db}.transactions_realtime")
    ((current,),) = rows(f"SELECT count() FROM {db}.transactions_realtime FINAL")
    ((purchases, funnel_rows),) = rows(
        f"SELECT countIf(event_type = 'purchase'), countIf(event_type IN {_FUNNEL_TYPES}) "
        f"FROM {db}.user_events_realtime"
    )
    # The views' totals: equal to the base table's when every block reached them exactly once.
    ((summary,),) = rows(f"SELECT sum(event_count) FROM {db}.user_activity_summary")
    ((funnel_total,),) = rows(f"SELECT sum({' + '.join(FUNNEL_STEPS)}) FROM {db}.conversion_funnel")
    ((orders,),) = rows(f"SELECT sum(orders) FROM {db}.orders_per_minute")
    ((category_orders,),) = rows(f"SELECT sum(orders) FROM {db}.category_sales_5m")
    ((product_orders,),) = rows(f"SELECT sum(orders) FROM {db}.product_sales_15m")
    out += [
        ["user_events_realtime: distinct event_id", int(distinct_events)],
        ["user_events_realtime: duplicate rows", int(events) - int(distinct_events)],
        ["user_events_realtime: purchases", int(purchases)],
        ["user_events_realtime: funnel events", int(funnel_rows)],
        ["user_activity_summary: events", int(summary or 0)],
        ["conversion_funnel: events", int(funnel_total or 0)],
        ["orders_per_minute: orders", int(orders or 0)],
        ["category_sales_5m: orders", int(category_orders or 0)],
        ["product_sales_15m: orders", int(product_orders or 0)],
        ["transactions_realtime: distinct transaction_id", int(transactions)],
        ["transactions_realtime: current (FINAL, deletes hidden)", int(current)],
        ["transactions_realtime: changes", int(changes)],
    ]
    return Result("counts", "Rows per table", ["table", "rows"], out)


def daily(rows: Rows, db: str) -> Result:
    """Rows, distinct events and revenue per UTC day of event time and event type (the reconciliation's input).

    - events: distinct event_id; revenue: read with FINAL, which collapses the copies of an event in unmerged
      parts, so each event's amount is summed once;
    - rows: the rows without FINAL, or the count the activity view `user_activity_summary` holds when that is
      more. The base table (ReplacingMergeTree) forgets a copy once its parts merge; the view, fed at insert
      time, keeps counting it for good. Exactly one row per event makes all three equal.
    """
    counted = {
        (str(day), str(kind)): (int(n), int(distinct))
        for day, kind, n, distinct in rows(
            f"SELECT event_date, event_type, count(), uniqExact(event_id) FROM {db}.user_events_realtime "
            "GROUP BY event_date, event_type"
        )
    }
    revenue = {
        (str(day), str(kind)): float(total or 0)
        for day, kind, total in rows(
            f"SELECT event_date, event_type, round(sum(amount), 2) FROM {db}.user_events_realtime FINAL "
            "GROUP BY event_date, event_type"
        )
    }
    viewed = {
        (str(day), str(kind)): int(n or 0)
        for day, kind, n in rows(
            f"SELECT date, event_type, sum(event_count) FROM {db}.user_activity_summary GROUP BY date, event_type"
        )
    }
    out = []
    for key in sorted(set(counted) | set(viewed)):
        n, distinct = counted.get(key, (0, 0))
        out.append([key[0], key[1], max(n, viewed.get(key, 0)), distinct, revenue.get(key, 0.0)])
    return Result(
        "daily",
        "Rows, events and revenue per day (UTC) and event type",
        ["day", "event_type", "rows", "events", "revenue"],
        out,
    )


QUERIES: dict[str, Callable[[Rows, str], Result]] = {
    "funnel": funnel,
    "revenue": revenue,
    "top-products": top_products,
    "categories": categories,
    "counts": counts,
    "daily": daily,
}


def run(name: str, rows: Rows, db: str) -> Result:
    try:
        query = QUERIES[name]
    except KeyError:
        raise KeyError(f"unknown query {name!r}; known: {', '.join(QUERIES)}") from None
    return query(rows, db)


def counts_dict(result: Result) -> dict[str, int]:
    """`counts` as {table or figure: rows} (the run summary's shape)."""
    return {str(name): int(value) for name, value in result.rows}


def render_text(result: Result) -> str:
    """A plain table for a terminal."""
    cells = [[("" if v is None else str(v)) for v in row] for row in result.rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(result.columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True))
    out = [result.title, line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    if not cells:
        out.append("(no rows yet)")
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
