"""The loader's SQL, built from the schema names. Every statement here runs against the real fakesnow server in
the integration tests; parameters are pyformat (`%(batch)s`), bound by the connector.

Phase 1 of a batch (one transaction): drop what a crashed earlier attempt left in RAW, COPY the staged files
into RAW, record the batch as PENDING. Phase 2 (one transaction): merge the batch's RAW rows into STAGING,
recompute the dimension and the marts for the keys the batch touched, record the batch in LOADS and clear
PENDING. Every statement reads the batch from RAW by BATCH_ID, never from the COPY's result, so a phase that
runs again finds the same input.

A batch that re-reads rows loaded before (`lake.Plan.rereads`: a re-created topic and its older rows, offsets gone
backwards, no lp.offsets) is copied into its table's scratch twin `CONTROL.INCOMING_<TABLE>` instead, and
phase 1 moves into RAW only the rows whose `RAW_IDENTITY` RAW does not hold yet, then empties the scratch
table, all in the same transaction: RAW holds each archived row once, whatever the lake's offsets did.

The merges are written as an upsert by key, DELETE of the rows being replaced then INSERT of the new ones,
rather than `MERGE INTO`: the result is the one a MERGE (WHEN MATCHED UPDATE all / WHEN NOT MATCHED INSERT)
gives, on Snowflake as on fakesnow, and it can run inside the explicit transaction that makes phase 2 all or
nothing. fakesnow 0.12.1 cannot run a MERGE inside an explicit transaction at all (its MERGE creates a
temporary table and DuckDB then refuses the write), and the crash guarantees rest on that transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

TRACKED_USER_COLUMNS = ("USER_TIER", "USER_COUNTRY")
NULL_MARK = "~"  # a null tracked value in the hash (no tier or country is spelled "~")


@dataclass(frozen=True)
class Schemas:
    raw: str = "RAW"
    staging: str = "STAGING"
    marts: str = "MARTS"
    control: str = "CONTROL"

    def as_dict(self) -> dict[str, str]:
        return {"raw": self.raw, "staging": self.staging, "marts": self.marts, "control": self.control}

    @property
    def stage(self) -> str:
        return f"{self.control}.LOADER_STAGE"


RAW_TABLES = {"user_events": "USER_EVENTS", "transactions": "TRANSACTIONS"}
# What one archived row is: where the archiver found it and the business key STAGING dedupes on. The position
# alone is not enough (a re-created topic uses offsets again, for other events); the key alone would drop the
# lake's own second copies of an event (RAW keeps every archived row, STAGING one per key).
RAW_IDENTITY = {
    "user_events": ("ARCHIVE_POSITION", "EVENT_ID"),
    "transactions": ("ARCHIVE_POSITION", "TRANSACTION_ID", "CHANGE_KEY"),
}


# --- SCD2 hash (the SQL and its Python twin must agree: tests check both) -------------------------------------------
def attributes_hash_sql(prefix: str = "") -> str:
    parts = ", ".join(f"COALESCE({prefix}{c}, '{NULL_MARK}')" for c in TRACKED_USER_COLUMNS)
    return f"MD5(CONCAT_WS('|', {parts}))"


def attributes_hash(*values: str | None) -> str:
    """MD5 hex of the tracked values joined by '|' (None as '~'), as `attributes_hash_sql` computes it."""
    if len(values) != len(TRACKED_USER_COLUMNS):
        raise ValueError(f"expected {len(TRACKED_USER_COLUMNS)} values ({', '.join(TRACKED_USER_COLUMNS)})")
    text = "|".join(NULL_MARK if v is None else v for v in values)
    return hashlib.md5(text.encode()).hexdigest()


def user_key(user_id: str, first_event_id: str) -> str:
    """The surrogate key of a DIM_USERS version, as the SQL computes it."""
    return hashlib.md5(f"{user_id}|{first_event_id}".encode()).hexdigest()


# --- stage and phase 1 -------------------------------------------------------------------------------------------
def create_stage(s: Schemas) -> str:
    return f"CREATE STAGE IF NOT EXISTS {s.stage}"


def put(local_path: str, s: Schemas, table: str, batch_id: str) -> str:
    if "'" in local_path:
        raise ValueError(f"a local path with a quote cannot be PUT: {local_path!r}")
    return f"PUT 'file://{local_path}' @{s.stage}/{table}/{batch_id}/ OVERWRITE = TRUE AUTO_COMPRESS = FALSE"


def delete_pending_raw(s: Schemas, table: str) -> str:
    """RAW rows of batches an earlier attempt copied but never merged."""
    return (
        f"DELETE FROM {s.raw}.{RAW_TABLES[table]} WHERE BATCH_ID IN "
        f"(SELECT BATCH_ID FROM {s.control}.PENDING WHERE TABLE_NAME = %(table)s)"
    )


def delete_raw_batch(s: Schemas, table: str) -> str:
    return f"DELETE FROM {s.raw}.{RAW_TABLES[table]} WHERE BATCH_ID = %(batch)s"


def clear_pending(s: Schemas) -> str:
    return f"DELETE FROM {s.control}.PENDING WHERE TABLE_NAME = %(table)s"


def copy_into(s: Schemas, table: str, batch_id: str, *, incoming: bool = False) -> str:
    """Into RAW (or its scratch twin, `incoming`). FORCE: the same file name may have been loaded by a
    rolled-back or deleted attempt; PURGE: no leftovers."""
    target = incoming_table(s, table) if incoming else f"{s.raw}.{RAW_TABLES[table]}"
    return (
        f"COPY INTO {target} FROM @{s.stage}/{table}/{batch_id}/ "
        "FILE_FORMAT = (TYPE = PARQUET) MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE FORCE = TRUE PURGE = TRUE"
    )


# --- phase 1 of a batch that re-reads rows: the scratch twin ----------------------------------------------------
def incoming_table(s: Schemas, table: str) -> str:
    return f"{s.control}.INCOMING_{RAW_TABLES[table]}"


def create_incoming(s: Schemas, table: str) -> str:
    """The scratch twin of a RAW table, re-created at every start so its columns are RAW's (it holds rows only
    inside phase 1's transaction). TRANSIENT: no fail-safe storage for scratch rows."""
    return f"CREATE OR REPLACE TRANSIENT TABLE {incoming_table(s, table)} LIKE {s.raw}.{RAW_TABLES[table]}"


def clear_incoming(s: Schemas, table: str) -> str:
    return f"DELETE FROM {incoming_table(s, table)}"


def incoming_rows(s: Schemas, table: str) -> str:
    return f"SELECT COUNT(*) FROM {incoming_table(s, table)}"


def insert_unseen(s: Schemas, table: str) -> str:
    """The scratch rows whose identity RAW does not hold yet, into RAW. Run after the batch's own earlier rows
    and PENDING batches' rows were deleted, so only committed batches count as seen."""
    raw = f"{s.raw}.{RAW_TABLES[table]}"
    same = " AND ".join(f"r.{c} = i.{c}" for c in RAW_IDENTITY[table])
    return (
        f"INSERT INTO {raw} SELECT * FROM {incoming_table(s, table)} i "
        f"WHERE NOT EXISTS (SELECT 1 FROM {raw} r WHERE {same})"
    )


def add_pending(s: Schemas) -> str:
    return f"INSERT INTO {s.control}.PENDING (TABLE_NAME, BATCH_ID, STAGED_AT) SELECT %(table)s, %(batch)s, SYSDATE()"


def raw_batch_rows(s: Schemas, table: str) -> str:
    return f"SELECT COUNT(*) FROM {s.raw}.{RAW_TABLES[table]} WHERE BATCH_ID = %(batch)s"


# --- control -------------------------------------------------------------------------------------------------------
def last_load(s: Schemas) -> str:
    return (
        f"SELECT SNAPSHOT_ID, OFFSETS, BATCH_ID FROM {s.control}.LOADS WHERE TABLE_NAME = %(table)s "
        "ORDER BY LOADED_AT DESC, SNAPSHOT_ID DESC LIMIT 1"
    )


def record_load(s: Schemas) -> str:
    return (
        f"INSERT INTO {s.control}.LOADS (TABLE_NAME, BATCH_ID, SNAPSHOT_ID, OFFSETS, FROM_OFFSETS, ROWS_LOADED, "
        "LOADED_AT) SELECT %(table)s, %(batch)s, %(snapshot)s, %(offsets)s, %(from_offsets)s, %(rows)s, SYSDATE()"
    )


# --- phase 2: events -----------------------------------------------------------------------------------------------
EVENT_COLUMNS = (
    "EVENT_ID", "EVENT_TYPE", "EVENT_TIME", "EVENT_DATE", "EVENT_HOUR", "USER_ID", "SESSION_ID", "PRODUCT_ID",
    "TRANSACTION_ID", "QUANTITY", "PRICE", "AMOUNT", "DEVICE_TYPE", "COUNTRY", "SOURCE", "USER_TIER", "USER_COUNTRY",
    "USER_CITY", "USER_REGISTRATION_DATE", "USER_EMAIL_HASH", "PRODUCT_CATEGORY", "PRODUCT_BRAND", "VALIDATED_AT",
    "ARCHIVE_POSITION", "BATCH_ID",
)  # fmt: skip
_EVENT_CASTS = {"PRICE": "CAST(PRICE AS NUMBER(18, 2))", "AMOUNT": "CAST(AMOUNT AS NUMBER(18, 2))"}


def _upsert(target: str, source: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> list[str]:
    """Replace the target rows whose key is in `source` by the source rows (a MERGE that updates every column
    when matched and inserts otherwise). `source` yields exactly one row per key."""
    on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    names = ", ".join(columns)
    return [
        f"DELETE FROM {target} t USING ({source}) s WHERE {on}",
        f"INSERT INTO {target} ({names}) SELECT {names} FROM ({source})",
    ]


def _first_wins(target: str, source: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> list[str]:
    """Like `_upsert`, but a stored row is replaced only by a source row archived earlier (lower
    ARCHIVE_POSITION), and new keys are inserted: the row archived first wins, whatever the batches were."""
    on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    names = ", ".join(columns)
    return [
        f"DELETE FROM {target} t USING ({source}) s WHERE {on} AND s.ARCHIVE_POSITION < t.ARCHIVE_POSITION",
        f"INSERT INTO {target} ({names}) SELECT {', '.join(f's.{c}' for c in columns)} FROM ({source}) s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE {on})",
    ]


def _dedupe(select: str, source: str, keys: str, where: str) -> str:
    """One row per key: the one archived first."""
    return (
        f"SELECT {select} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY ARCHIVE_POSITION) AS RN "
        f"FROM {source} WHERE {where}) WHERE RN = 1"
    )


def merge_events_cleaned(s: Schemas) -> list[str]:
    """One row per EVENT_ID: the batch's first archived copy, replacing a stored one only if archived earlier."""
    select = ", ".join(f"{_EVENT_CASTS.get(c, c)} AS {c}" for c in EVENT_COLUMNS)
    source = _dedupe(select, f"{s.raw}.USER_EVENTS", "EVENT_ID", "BATCH_ID = %(batch)s")
    return _first_wins(f"{s.staging}.EVENTS_CLEANED", source, ("EVENT_ID",), EVENT_COLUMNS)


def _batch_keys(s: Schemas, raw_table: str, column: str) -> str:
    return f"SELECT DISTINCT {column} FROM {s.raw}.{raw_table} WHERE BATCH_ID = %(batch)s AND {column} IS NOT NULL"


DIM_COLUMNS = (
    "USER_KEY", "USER_ID", "USER_TIER", "USER_COUNTRY", "USER_CITY", "USER_REGISTRATION_DATE", "USER_EMAIL_HASH",
    "ATTRIBUTES_HASH", "VALID_FROM", "VALID_TO", "IS_CURRENT",
)  # fmt: skip


def user_versions(s: Schemas) -> str:
    """Every SCD2 version of the users the batch touched, from all their events: a version starts at each event
    whose tracked-columns hash differs from the previous event's (events without user attributes are skipped)."""
    return (
        "WITH ev AS ("
        " SELECT USER_ID, EVENT_ID, EVENT_TIME, USER_TIER, USER_COUNTRY, USER_CITY, USER_REGISTRATION_DATE,"
        f" USER_EMAIL_HASH, {attributes_hash_sql()} AS ATTRIBUTES_HASH"
        f" FROM {s.staging}.EVENTS_CLEANED"
        f" WHERE USER_ID IN ({_batch_keys(s, 'USER_EVENTS', 'USER_ID')})"
        " AND (USER_TIER IS NOT NULL OR USER_COUNTRY IS NOT NULL)"
        "), marked AS ("
        " SELECT ev.*, LAG(ATTRIBUTES_HASH) OVER (PARTITION BY USER_ID ORDER BY EVENT_TIME, EVENT_ID) AS PREV_HASH"
        " FROM ev"
        "), starts AS ("
        " SELECT * FROM marked WHERE PREV_HASH IS NULL OR PREV_HASH <> ATTRIBUTES_HASH"
        "), versions AS ("
        " SELECT MD5(USER_ID || '|' || EVENT_ID) AS USER_KEY, USER_ID, USER_TIER, USER_COUNTRY, USER_CITY,"
        " USER_REGISTRATION_DATE, USER_EMAIL_HASH, ATTRIBUTES_HASH, EVENT_TIME AS VALID_FROM,"
        " LEAD(EVENT_TIME) OVER (PARTITION BY USER_ID ORDER BY EVENT_TIME, EVENT_ID) AS VALID_TO"
        " FROM starts"
        ") SELECT versions.*, VALID_TO IS NULL AS IS_CURRENT FROM versions"
    )


def merge_dim_users(s: Schemas) -> list[str]:
    """The touched users' versions, recomputed: a new version is inserted, the one it follows is expired
    (VALID_TO = the new VALID_FROM, IS_CURRENT false), and a version a late event made obsolete disappears."""
    names = ", ".join(DIM_COLUMNS)
    return [
        f"DELETE FROM {s.marts}.DIM_USERS WHERE USER_ID IN ({_batch_keys(s, 'USER_EVENTS', 'USER_ID')})",
        f"INSERT INTO {s.marts}.DIM_USERS ({names}) SELECT {names} FROM ({user_versions(s)})",
    ]


SESSION_COLUMNS = (
    "SESSION_ID", "USER_ID", "SESSION_DATE", "SESSION_START", "SESSION_END", "DURATION_S", "EVENTS", "PAGE_VIEWS",
    "PRODUCT_VIEWS", "ADD_TO_CARTS", "PURCHASES", "REVENUE", "CONVERTED",
)  # fmt: skip


def merge_user_sessions(s: Schemas) -> list[str]:
    source = (
        "SELECT SESSION_ID, MIN(USER_ID) AS USER_ID, MIN(EVENT_DATE) AS SESSION_DATE,"
        " MIN(EVENT_TIME) AS SESSION_START, MAX(EVENT_TIME) AS SESSION_END,"
        " DATEDIFF('second', MIN(EVENT_TIME), MAX(EVENT_TIME)) AS DURATION_S, COUNT(*) AS EVENTS,"
        " COUNT_IF(EVENT_TYPE = 'page_view') AS PAGE_VIEWS, COUNT_IF(EVENT_TYPE = 'product_view') AS PRODUCT_VIEWS,"
        " COUNT_IF(EVENT_TYPE = 'add_to_cart') AS ADD_TO_CARTS, COUNT_IF(EVENT_TYPE = 'purchase') AS PURCHASES,"
        " CAST(COALESCE(SUM(IFF(EVENT_TYPE = 'purchase', AMOUNT, NULL)), 0) AS NUMBER(18, 2)) AS REVENUE,"
        " COUNT_IF(EVENT_TYPE = 'purchase') > 0 AS CONVERTED"
        f" FROM {s.staging}.EVENTS_CLEANED"
        f" WHERE SESSION_ID IN ({_batch_keys(s, 'USER_EVENTS', 'SESSION_ID')})"
        " GROUP BY SESSION_ID"
    )
    return _upsert(f"{s.marts}.USER_SESSIONS", source, ("SESSION_ID",), SESSION_COLUMNS)


DAILY_COLUMNS = (
    "METRIC_DATE", "EVENTS", "ACTIVE_USERS", "SESSIONS", "PAGE_VIEWS", "PRODUCT_VIEWS", "ADD_TO_CARTS", "PURCHASES",
    "REVENUE", "VIEWING_SESSIONS", "CART_SESSIONS", "PURCHASING_SESSIONS", "SESSION_TO_PURCHASE_RATE",
    "VIEW_TO_CART_RATE", "CART_TO_PURCHASE_RATE",
)  # fmt: skip


def _rate(numerator: str, denominator: str) -> str:
    return f"CAST({numerator} / NULLIF({denominator}, 0) AS NUMBER(9, 4))"


def merge_daily_metrics(s: Schemas) -> list[str]:
    counts = (
        "SELECT EVENT_DATE AS METRIC_DATE, COUNT(*) AS EVENTS, COUNT(DISTINCT USER_ID) AS ACTIVE_USERS,"
        " COUNT(DISTINCT SESSION_ID) AS SESSIONS,"
        " COUNT_IF(EVENT_TYPE = 'page_view') AS PAGE_VIEWS, COUNT_IF(EVENT_TYPE = 'product_view') AS PRODUCT_VIEWS,"
        " COUNT_IF(EVENT_TYPE = 'add_to_cart') AS ADD_TO_CARTS, COUNT_IF(EVENT_TYPE = 'purchase') AS PURCHASES,"
        " CAST(COALESCE(SUM(IFF(EVENT_TYPE = 'purchase', AMOUNT, NULL)), 0) AS NUMBER(18, 2)) AS REVENUE,"
        " COUNT(DISTINCT IFF(EVENT_TYPE = 'product_view', SESSION_ID, NULL)) AS VIEWING_SESSIONS,"
        " COUNT(DISTINCT IFF(EVENT_TYPE = 'add_to_cart', SESSION_ID, NULL)) AS CART_SESSIONS,"
        " COUNT(DISTINCT IFF(EVENT_TYPE = 'purchase', SESSION_ID, NULL)) AS PURCHASING_SESSIONS"
        f" FROM {s.staging}.EVENTS_CLEANED"
        f" WHERE EVENT_DATE IN ({_batch_keys(s, 'USER_EVENTS', 'EVENT_DATE')})"
        " GROUP BY EVENT_DATE"
    )
    source = (
        "SELECT c.*,"
        f" {_rate('PURCHASING_SESSIONS', 'SESSIONS')} AS SESSION_TO_PURCHASE_RATE,"
        f" {_rate('CART_SESSIONS', 'VIEWING_SESSIONS')} AS VIEW_TO_CART_RATE,"
        f" {_rate('PURCHASING_SESSIONS', 'CART_SESSIONS')} AS CART_TO_PURCHASE_RATE"
        f" FROM ({counts}) c"
    )
    return _upsert(f"{s.marts}.DAILY_METRICS", source, ("METRIC_DATE",), DAILY_COLUMNS)


# --- phase 2: transactions -------------------------------------------------------------------------------------
CHANGE_COLUMNS = (
    "TRANSACTION_ID", "CHANGE_KEY", "SOURCE_LSN", "OP", "CHANGED_AT", "STATUS", "USER_ID", "PRODUCT_ID", "QUANTITY",
    "UNIT_PRICE", "DISCOUNT", "TAX", "TOTAL", "PAYMENT_METHOD", "CREATED_AT", "UPDATED_AT", "ARCHIVE_POSITION",
    "BATCH_ID",
)  # fmt: skip
# The order of a transaction's changes, and its reverse (nulls placed explicitly: engines differ by default).
CHANGE_ORDER = "SOURCE_LSN ASC NULLS FIRST, CHANGED_AT ASC, CHANGE_KEY ASC"
CHANGE_ORDER_DESC = "SOURCE_LSN DESC NULLS LAST, CHANGED_AT DESC, CHANGE_KEY DESC"


def merge_transaction_changes(s: Schemas) -> list[str]:
    """One row per (TRANSACTION_ID, CHANGE_KEY): a change delivered twice by CDC is kept once."""
    source = _dedupe(
        ", ".join(CHANGE_COLUMNS), f"{s.raw}.TRANSACTIONS", "TRANSACTION_ID, CHANGE_KEY", "BATCH_ID = %(batch)s"
    )
    return _first_wins(f"{s.staging}.TRANSACTION_CHANGES", source, ("TRANSACTION_ID", "CHANGE_KEY"), CHANGE_COLUMNS)


def _touched_transactions(s: Schemas) -> str:
    return _batch_keys(s, "TRANSACTIONS", "TRANSACTION_ID")


FACT_COLUMNS = (
    "TRANSACTION_ID", "USER_ID", "PRODUCT_ID", "QUANTITY", "UNIT_PRICE", "DISCOUNT", "TAX", "TOTAL", "PAYMENT_METHOD",
    "INITIAL_STATUS", "CURRENT_STATUS", "IS_DELETED", "CREATED_AT", "UPDATED_AT", "FIRST_CHANGED_AT",
    "LAST_CHANGED_AT", "CHANGE_COUNT", "LAST_SOURCE_LSN",
)  # fmt: skip


def merge_fact_transactions(s: Schemas) -> list[str]:
    source = (
        "WITH c AS ("
        " SELECT *, ROW_NUMBER() OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER + ") AS RN_FIRST,"
        " ROW_NUMBER() OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER_DESC + ") AS RN_LAST,"
        " COUNT(*) OVER (PARTITION BY TRANSACTION_ID) AS CHANGE_COUNT"
        f" FROM {s.staging}.TRANSACTION_CHANGES WHERE TRANSACTION_ID IN ({_touched_transactions(s)})"
        ")"
        " SELECT l.TRANSACTION_ID, l.USER_ID, l.PRODUCT_ID, l.QUANTITY, l.UNIT_PRICE, l.DISCOUNT, l.TAX, l.TOTAL,"
        " l.PAYMENT_METHOD, f.STATUS AS INITIAL_STATUS, l.STATUS AS CURRENT_STATUS, l.OP = 'd' AS IS_DELETED,"
        " COALESCE(l.CREATED_AT, f.CREATED_AT) AS CREATED_AT, l.UPDATED_AT, f.CHANGED_AT AS FIRST_CHANGED_AT,"
        " l.CHANGED_AT AS LAST_CHANGED_AT, l.CHANGE_COUNT, l.SOURCE_LSN AS LAST_SOURCE_LSN"
        " FROM c l JOIN c f ON f.TRANSACTION_ID = l.TRANSACTION_ID AND f.RN_FIRST = 1"
        " WHERE l.RN_LAST = 1"
    )
    return _upsert(f"{s.marts}.FACT_TRANSACTIONS", source, ("TRANSACTION_ID",), FACT_COLUMNS)


HISTORY_COLUMNS = (
    "TRANSACTION_ID", "CHANGE_KEY", "SOURCE_LSN", "OP", "STATUS", "PREVIOUS_STATUS", "VALID_FROM", "VALID_TO",
    "IS_CURRENT",
)  # fmt: skip


def delete_status_history(s: Schemas) -> str:
    return f"DELETE FROM {s.marts}.FACT_TRANSACTION_STATUS_HISTORY WHERE TRANSACTION_ID IN ({_touched_transactions(s)})"


def insert_status_history(s: Schemas) -> str:
    """The touched transactions' status history, rebuilt from all their changes (after `delete_status_history`:
    a late change may fall between two stored ones, so their rows are recomputed, not appended to)."""
    return (
        f"INSERT INTO {s.marts}.FACT_TRANSACTION_STATUS_HISTORY ({', '.join(HISTORY_COLUMNS)}) "
        "WITH c AS ("
        " SELECT TRANSACTION_ID, CHANGE_KEY, SOURCE_LSN, OP, STATUS, CHANGED_AT,"
        " ROW_NUMBER() OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER + ") AS RN,"
        " LAG(STATUS) OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER + ") AS PREVIOUS_STATUS"
        f" FROM {s.staging}.TRANSACTION_CHANGES WHERE TRANSACTION_ID IN ({_touched_transactions(s)})"
        "), h AS ("
        " SELECT * FROM c WHERE RN = 1 OR OP = 'd' OR STATUS IS DISTINCT FROM PREVIOUS_STATUS"
        "), ordered AS ("
        " SELECT TRANSACTION_ID, CHANGE_KEY, SOURCE_LSN, OP, STATUS, PREVIOUS_STATUS, CHANGED_AT AS VALID_FROM,"
        " LEAD(CHANGED_AT) OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER + ") AS VALID_TO,"
        " ROW_NUMBER() OVER (PARTITION BY TRANSACTION_ID ORDER BY " + CHANGE_ORDER_DESC + ") = 1 AS IS_CURRENT"
        " FROM h"
        f") SELECT {', '.join(HISTORY_COLUMNS)} FROM ordered"
    )


def phase_two(s: Schemas, table: str) -> list[tuple[str, str]]:
    """(step name, statement) of phase 2 for `table`, in order (before recording the load)."""
    if table == "user_events":
        steps = {
            "events_cleaned": merge_events_cleaned(s),
            "dim_users": merge_dim_users(s),
            "user_sessions": merge_user_sessions(s),
            "daily_metrics": merge_daily_metrics(s),
        }
    elif table == "transactions":
        steps = {
            "transaction_changes": merge_transaction_changes(s),
            "fact_transactions": merge_fact_transactions(s),
            "status_history": [delete_status_history(s), insert_status_history(s)],
        }
    else:
        raise ValueError(f"unknown table {table!r}")
    return [(name, statement) for name, statements in steps.items() for statement in statements]
