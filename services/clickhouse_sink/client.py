"""Two ways to reach ClickHouse behind one small interface, so the sink's logic is the same on both.

- `ChdbClient`: chDB, the ClickHouse engine in-process, data in a local folder (the local default). One
  process per data folder: chDB locks it, so nothing else can open it while the sink runs (the query command
  asks the running sink instead, see `query_server`).
- `NativeClient`: a ClickHouse server over the native protocol (clickhouse-driver), for Kubernetes.

Both insert an Arrow table with `INSERT INTO t (...) SELECT <expressions> FROM {source}`: chDB reads the
table in place (`Python(...)`), the server receives it as columns for its `input(...)` table function, so the
conversions in the expressions run inside ClickHouse either way. Both decode Avro with chDB's reader (see
`decode`); on the server path chDB runs in memory for that alone.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    """The chDB data folder is in use by another process."""


class ClickHouseClient(ABC):
    kind: str

    @abstractmethod
    def execute(self, sql: str) -> None: ...

    @abstractmethod
    def rows(self, sql: str) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def insert_arrow(self, sql: str, table: pa.Table, settings: Mapping[str, Any], structure: str) -> None:
        """Run `sql` (containing `{source}`) with `table` as the source; `structure` gives its ClickHouse types."""

    @abstractmethod
    def decode_arrow(self, sql: str) -> pa.Table:
        """Run a read-only query in the engine that decodes Avro batches (always chDB)."""

    @abstractmethod
    def close(self) -> None: ...


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class ChdbClient(ClickHouseClient):
    kind = "chdb"

    def __init__(self, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        try:
            self.session = session.Session(str(path))
        except Exception as error:
            if "lock" in str(error).lower() or "already initialized" in str(error).lower():
                raise StoreLocked(
                    f"the chDB data folder {path} is in use by another process (a running clickhouse-sink?)"
                ) from error
            raise
        self.path = path

    def _query(self, sql: str, fmt: str = "CSV", frame_data: pa.Table | None = None) -> Any:
        data = frame_data  # noqa: F841 - chDB's Python(data) finds the table by this local name
        try:
            return self.session.query(sql, fmt)
        except Exception:
            # chDB 4.4: after a failed query the NEXT query's Arrow output is garbled (seen here: "Unexpected
            # empty message in IPC file format"). A throwaway query takes the damage.
            with contextlib.suppress(Exception):  # the original error is the one that matters
                self.session.query("SELECT 1")
            raise

    def execute(self, sql: str) -> None:
        self._query(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        table = self._query(sql, "ArrowTable")
        return [tuple(row.values()) for row in table.to_pylist()]

    def insert_arrow(self, sql: str, table: pa.Table, settings: Mapping[str, Any], structure: str) -> None:
        clause = ", ".join(f"{key} = {_literal(value)}" for key, value in settings.items())
        # One Arrow table per insert, in one chunk (appending several streams to one insert lost rows here).
        self._query(
            sql.replace("{source}", "Python(data)") + (f" SETTINGS {clause}" if clause else ""),
            frame_data=table.combine_chunks(),
        )

    def decode_arrow(self, sql: str) -> pa.Table:
        return self._query(sql, "ArrowTable")

    def close(self) -> None:
        self.session.close()


class NativeClient(ClickHouseClient):
    kind = "native"

    def __init__(
        self,
        host: str,
        port: int = 9000,
        user: str = "default",
        password: str = "",
        secure: bool = False,
        connect_timeout_s: float = 5.0,
        send_receive_timeout_s: float = 60.0,
        driver: Any = None,
    ) -> None:
        if driver is None:
            from clickhouse_driver import Client

            driver = Client(
                host=host,
                port=port,
                user=user,
                password=password,
                secure=secure,
                connect_timeout=connect_timeout_s,
                send_receive_timeout=send_receive_timeout_s,
                client_name="lambda-pipeline-clickhouse-sink",
            )
        self.driver = driver
        self._decoder: Any = None

    def execute(self, sql: str) -> None:
        self.driver.execute(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.driver.execute(sql)]

    def insert_arrow(self, sql: str, table: pa.Table, settings: Mapping[str, Any], structure: str) -> None:
        escaped = structure.replace("\\", "\\\\").replace("'", "\\'")
        columns = [python_column(table.column(i)) for i in range(table.num_columns)]
        self.driver.execute(
            sql.replace("{source}", f"input('{escaped}')"), columns, columnar=True, settings=dict(settings)
        )

    def decode_arrow(self, sql: str) -> pa.Table:
        if self._decoder is None:
            from chdb import session

            self._decoder = session.Session()  # in memory: only decodes, stores nothing
        return self._decoder.query(sql, "ArrowTable")

    def close(self) -> None:
        self.driver.disconnect()
        if self._decoder is not None:
            self._decoder.close()


def python_column(column: pa.ChunkedArray) -> list[Any]:
    """Values as clickhouse-driver takes them (maps as dicts; the rest as Arrow gives them)."""
    values = column.to_pylist()
    if pa.types.is_map(column.type):
        return [dict(v) if v is not None else {} for v in values]
    return values
