"""PostgreSQL (OLTP) writer for the generator: users, products, transactions and their status changes.

Every write is idempotent, so a generator re-run with the same seed never fails on duplicate keys:
users/products are upserted (and only rewritten when something changed, to keep CDC quiet), transactions are
inserted with ON CONFLICT DO NOTHING, and a status change applies only while the row still has the change's old
status (it never moves a transaction backwards).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.generator.model import Product, StatusChange, Transaction, User
from services.kit.paths import repo_root

TABLES = ("users", "products", "transactions")
# Serialises concurrent apply_schema calls (two generators starting together would race on CREATE ... IF NOT EXISTS).
_SCHEMA_LOCK_KEY = 0x6C705F6F6C7470  # "lp_oltp"

USER_COLUMNS = (
    "user_id",
    "email",
    "first_name",
    "last_name",
    "tier",
    "country",
    "city",
    "registration_date",
    "created_at",
    "updated_at",
)
PRODUCT_COLUMNS = (
    "product_id",
    "name",
    "category",
    "subcategory",
    "brand",
    "price",
    "cost",
    "created_at",
    "updated_at",
)
TRANSACTION_COLUMNS = (
    "transaction_id",
    "user_id",
    "product_id",
    "quantity",
    "unit_price",
    "discount",
    "tax",
    "total",
    "payment_method",
    "shipping_address",
    "status",
    "created_at",
    "updated_at",
)
STATUS_CHANGE_STAGE_COLUMNS = ("round", "transaction_id", "old_status", "new_status", "changed_at")

# Batches go through COPY into per-connection temp tables: psycopg's COPY costs ~11 us/row in Python, while
# passing Python lists as array parameters (unnest) cost ~50 us/row here (psycopg's text array dumper).
_STAGE_DDL = {
    "stage_users": "CREATE TEMP TABLE IF NOT EXISTS stage_users (LIKE users INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    "stage_products": (
        "CREATE TEMP TABLE IF NOT EXISTS stage_products (LIKE products INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    ),
    "stage_transactions": (
        "CREATE TEMP TABLE IF NOT EXISTS stage_transactions (LIKE transactions INCLUDING DEFAULTS) "
        "ON COMMIT DELETE ROWS"
    ),
    "stage_status_changes": (
        "CREATE TEMP TABLE IF NOT EXISTS stage_status_changes (round integer, transaction_id uuid, "
        "old_status text, new_status text, changed_at timestamptz) ON COMMIT DELETE ROWS"
    ),
}
_INSERT_TRANSACTIONS = sql.SQL(
    "INSERT INTO transactions ({columns}) SELECT {columns} FROM stage_transactions "
    "ON CONFLICT (transaction_id) DO NOTHING"
).format(columns=sql.SQL(", ").join(map(sql.Identifier, TRANSACTION_COLUMNS)))
# The old-status guard makes replays harmless and keeps statuses monotonic.
_APPLY_STATUS_CHANGES = """
    UPDATE transactions AS t
       SET status = s.new_status, updated_at = s.changed_at
      FROM stage_status_changes AS s
     WHERE s.round = %s AND t.transaction_id = s.transaction_id AND t.status = s.old_status
"""


class OltpUnavailableError(ConnectionError):
    """PostgreSQL cannot be reached (or the connection broke); the message names the DSN without password."""


def redact_dsn(dsn: str) -> str:
    """The DSN in key=value form without the password, for logs and error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        # Unparseable: mask anything that looks like a password rather than echo it.
        masked = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", masked, flags=re.IGNORECASE)
    params.pop("password", None)
    return make_conninfo(**params)


def _user_row(user: User) -> tuple[Any, ...]:
    return (
        user.user_id,
        user.email,
        user.first_name,
        user.last_name,
        user.tier,
        user.country,
        user.city,
        user.registration_date,
        user.created_at,
        user.updated_at,
    )


def _product_row(product: Product) -> tuple[Any, ...]:
    return (
        product.product_id,
        product.name,
        product.category,
        product.subcategory,
        product.brand,
        product.price,
        product.cost,
        product.created_at,
        product.updated_at,
    )


def _transaction_row(tx: Transaction) -> tuple[Any, ...]:
    return (
        tx.transaction_id,
        tx.user_id,
        tx.product_id,
        tx.quantity,
        tx.unit_price,
        tx.discount,
        tx.tax,
        tx.total,
        tx.payment_method,
        tx.shipping_address,
        tx.status,
        tx.created_at,
        tx.updated_at,
    )


def _status_change_rows(changes: Sequence[StatusChange]) -> tuple[list[tuple[Any, ...]], int]:
    """Number the changes of each transaction 0, 1, 2...: one UPDATE per round, because UPDATE ... FROM with two
    source rows for one target row applies only one of them. Returns (rows, number of rounds)."""
    seen: dict[str, int] = {}
    rows = []
    for change in changes:
        round_ = seen.get(change.transaction_id, 0)
        seen[change.transaction_id] = round_ + 1
        rows.append((round_, change.transaction_id, change.old_status, change.new_status, change.changed_at))
    return rows, max(seen.values(), default=0)


def _open(dsn: str, connect_timeout: int, application_name: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout, application_name=application_name)
    except psycopg.Error as exc:
        raise OltpUnavailableError(f"cannot connect to PostgreSQL at '{redact_dsn(dsn)}': {exc}".strip()) from exc


class OltpWriter:
    """Writes the generator's domain objects to PostgreSQL over one psycopg 3 connection (not thread-safe)."""

    def __init__(self, connection: psycopg.Connection[Any], dsn: str, *, connect_timeout: int = 5) -> None:
        self._conn = connection
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._application_name = connection.info.parameter_status("application_name") or "lp-generator"
        self.dsn_display = redact_dsn(dsn)
        self._staged: set[str] = set()  # temp stage tables that exist on the current connection

    @classmethod
    def connect(cls, dsn: str, *, connect_timeout: int = 5, application_name: str = "lp-generator") -> OltpWriter:
        """Connect, or raise ``OltpUnavailableError`` naming the DSN (password removed)."""
        return cls(_open(dsn, connect_timeout, application_name), dsn, connect_timeout=connect_timeout)

    def reconnect(self) -> None:
        """Replace a broken connection (after ``OltpUnavailableError``); raises it again if still unreachable."""
        self._conn.close()
        self._staged.clear()
        self._conn = _open(self._dsn, self._connect_timeout, self._application_name)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> OltpWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """One database transaction; a broken connection surfaces as ``OltpUnavailableError``."""
        try:
            with self._conn.transaction(), self._conn.cursor() as cursor:
                yield cursor
        except psycopg.OperationalError as exc:
            if self._conn.closed or self._conn.broken:
                raise OltpUnavailableError(f"lost connection to PostgreSQL at '{self.dsn_display}': {exc}") from exc
            raise

    # -- schema -------------------------------------------------------------------------------------------------------
    def apply_schema(self, path: Path | None = None) -> None:
        """Create tables, indexes and replica identity; idempotent and safe to run concurrently."""
        ddl = (path or repo_root() / "schemas" / "postgres" / "oltp.sql").read_text()
        with self._transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            cursor.execute(ddl)  # type: ignore[arg-type]  # trusted file; no parameters, several statements

    # -- writes -------------------------------------------------------------------------------------------------------
    def upsert_users(self, users: Iterable[User]) -> int:
        """Insert new users and update changed ones; returns rows inserted or updated."""
        rows = {u.user_id: _user_row(u) for u in users}  # last one wins if an id repeats
        return self._copy_upsert("users", USER_COLUMNS, list(rows.values()))

    def upsert_products(self, products: Iterable[Product]) -> int:
        """Insert new products and update changed ones; returns rows inserted or updated."""
        rows = {p.product_id: _product_row(p) for p in products}
        return self._copy_upsert("products", PRODUCT_COLUMNS, list(rows.values()))

    def _stage(self, cursor: psycopg.Cursor[Any], stage: str, columns: Sequence[str], rows: Iterable[Any]) -> None:
        """COPY rows into a temp table created once per connection and emptied at each commit."""
        if stage not in self._staged:
            cursor.execute(_STAGE_DDL[stage])  # type: ignore[arg-type]  # constant text
            self._staged.add(stage)
        column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
        with cursor.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(stage), column_list)) as copy:
            for row in rows:
                copy.write_row(row)

    def _copy_upsert(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> int:
        """Stage, then INSERT ... ON CONFLICT DO UPDATE only where a value differs (an unchanged re-run then
        produces no UPDATE, hence no CDC event). created_at is kept from the first write."""
        if not rows:
            return 0
        key, *values = columns
        updatable = [c for c in values if c != "created_at"]
        column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
        upsert = sql.SQL(
            "INSERT INTO {target} AS t ({columns}) SELECT {columns} FROM {stage} "
            "ON CONFLICT ({key}) DO UPDATE SET {assignments} WHERE ({current}) IS DISTINCT FROM ({incoming})"
        ).format(
            target=sql.Identifier(table),
            columns=column_list,
            stage=sql.Identifier(f"stage_{table}"),
            key=sql.Identifier(key),
            assignments=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updatable
            ),
            current=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in updatable),
            incoming=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in updatable),
        )
        with self._transaction() as cursor:
            self._stage(cursor, f"stage_{table}", columns, rows)
            cursor.execute(upsert)
            return cursor.rowcount

    def insert_transactions(self, transactions: Sequence[Transaction]) -> int:
        """Insert new transactions; ids already present are skipped. Returns rows inserted.
        Users and products must be written first (foreign keys)."""
        if not transactions:
            return 0
        with self._transaction() as cursor:
            return self._insert_transactions(cursor, transactions)

    def apply_status_changes(self, changes: Sequence[StatusChange]) -> int:
        """Apply status changes in order; a change whose old status no longer matches (replay, or a transaction
        not inserted yet) is skipped. Returns rows updated."""
        if not changes:
            return 0
        with self._transaction() as cursor:
            return self._apply_status_changes(cursor, changes)

    def write_batch(self, transactions: Sequence[Transaction], changes: Sequence[StatusChange]) -> tuple[int, int]:
        """Insert transactions, then apply status changes, in one database transaction: the order that keeps a
        change from arriving before its transaction. Returns (rows inserted, rows updated)."""
        if not transactions and not changes:
            return 0, 0
        with self._transaction() as cursor:
            inserted = self._insert_transactions(cursor, transactions) if transactions else 0
            updated = self._apply_status_changes(cursor, changes) if changes else 0
        return inserted, updated

    def _insert_transactions(self, cursor: psycopg.Cursor[Any], transactions: Sequence[Transaction]) -> int:
        self._stage(cursor, "stage_transactions", TRANSACTION_COLUMNS, map(_transaction_row, transactions))
        cursor.execute(_INSERT_TRANSACTIONS)
        return cursor.rowcount

    def _apply_status_changes(self, cursor: psycopg.Cursor[Any], changes: Sequence[StatusChange]) -> int:
        rows, rounds = _status_change_rows(changes)
        self._stage(cursor, "stage_status_changes", STATUS_CHANGE_STAGE_COLUMNS, rows)
        updated = 0
        for round_ in range(rounds):
            cursor.execute(_APPLY_STATUS_CHANGES, (round_,))
            updated += cursor.rowcount
        return updated

    # -- reads --------------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Row counts of users, products and transactions."""
        query = sql.SQL("SELECT {}").format(
            sql.SQL(", ").join(sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(t)) for t in TABLES)
        )
        with self._transaction() as cursor:
            row = cursor.execute(query).fetchone()
        assert row is not None
        return dict(zip(TABLES, (int(v) for v in row), strict=True))

    def status_counts(self) -> dict[str, int]:
        """Transactions per status (statuses with no rows are absent)."""
        with self._transaction() as cursor:
            rows = cursor.execute("SELECT status, count(*) FROM transactions GROUP BY status").fetchall()
        return {status: int(n) for status, n in rows}
