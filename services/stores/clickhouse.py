"""ClickHouse: where it is, two ways to reach it behind one small interface, and reading its named queries.

The settings say where ClickHouse is (the sink writes there, the query command and the reconciliation read).
The two clients keep the sink's logic the same on both:

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
import json
import logging
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.config import Host, HttpUrl, Port
from services.kit.dependencies import wait_for_tcp
from services.kit.paths import repo_root
from services.kit.reconnect import one_line

from . import clickhouse_queries as queries

log = logging.getLogger(__name__)


def default_chdb_path() -> Path:
    return repo_root() / ".local" / "clickhouse"


class ClickHouseSettings(BaseSettings):
    """Where ClickHouse is and how to log in (the sink, its query command, the reconciliation). Locally the
    running sink owns the chDB folder, so readers ask it on its query port (CLICKHOUSE_SINK_QUERY_*)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    clickhouse_client: Literal["chdb", "native"] = Field(
        "chdb", description="chdb: in-process engine with data in CLICKHOUSE_CHDB_PATH; native: a ClickHouse server."
    )
    clickhouse_chdb_path: Path = Field(default_factory=default_chdb_path, description="chDB data folder (local).")
    clickhouse_host: Host = Field("localhost", description="Server host (native).")
    clickhouse_port: Port = Field(9000, description="Native protocol port (9440 with TLS).")
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    clickhouse_secure: bool = Field(False, description="TLS to the server (native).")
    clickhouse_database: str = Field("lambda_pipeline", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    clickhouse_sink_query_port: int = Field(
        8124, ge=-1, le=65535, description="Port of the sink's read-only /query endpoint (-1: off, 0: any)."
    )
    clickhouse_sink_query_url: HttpUrl | None = Field(
        None, description="Where the query command finds a running sink (default: http://127.0.0.1:<query port>)."
    )

    @field_validator("clickhouse_chdb_path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def query_url(self) -> str:
        return self.clickhouse_sink_query_url or f"http://127.0.0.1:{self.clickhouse_sink_query_port}"


def wait_for_server(settings: ClickHouseSettings, timeout_s: float) -> None:
    """CLICKHOUSE_CLIENT=native: wait (at most `timeout_s`) until the server accepts connections; else one
    DependencyUnavailable naming CLICKHOUSE_HOST and the address. chDB runs in-process: nothing to wait for."""
    if settings.clickhouse_client == "native":
        address = f"{settings.clickhouse_host}:{settings.clickhouse_port}"
        wait_for_tcp("CLICKHOUSE_HOST", address, [(settings.clickhouse_host, settings.clickhouse_port)], timeout_s)


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

    def probe(self) -> str | None:
        """A readiness check that may run beside the writer's calls (its own session): None when the store
        answers. chDB runs inside the process: there is no session to lose, nothing to probe."""
        return None


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
    """A server over the native protocol. A call that fails on the network (the server restarted, the connection
    dropped or timed out) closes the connection, so the next call opens a new session: the caller's retry (the
    sink runner's backoff with jitter) is the reconnect loop. `probe()` asks `SELECT 1` on a second connection
    with short timeouts, so a hung server shows in /readyz while the writer waits."""

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
        self._probe_options = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "secure": secure,
            "connect_timeout": connect_timeout_s,
            "send_receive_timeout": connect_timeout_s,
            "client_name": "lambda-pipeline-probe",
        }
        self._probe_driver: Any = None

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.driver.execute(*args, **kwargs)
        except Exception as error:
            if is_connection_error(error):
                log.warning("clickhouse: the connection failed (%s): the next call opens a new one", one_line(error))
                with contextlib.suppress(Exception):
                    self.driver.disconnect()
            raise

    def execute(self, sql: str) -> None:
        self._call(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._call(sql)]

    def insert_arrow(self, sql: str, table: pa.Table, settings: Mapping[str, Any], structure: str) -> None:
        escaped = structure.replace("\\", "\\\\").replace("'", "\\'")
        columns = [python_column(table.column(i)) for i in range(table.num_columns)]
        self._call(sql.replace("{source}", f"input('{escaped}')"), columns, columnar=True, settings=dict(settings))

    def probe(self) -> str | None:
        try:
            if self._probe_driver is None:
                from clickhouse_driver import Client

                self._probe_driver = Client(**self._probe_options)
            self._probe_driver.execute("SELECT 1")
            return None
        except Exception as error:
            with contextlib.suppress(Exception):
                self._probe_driver.disconnect()
            self._probe_driver = None
            return one_line(error)

    def decode_arrow(self, sql: str) -> pa.Table:
        if self._decoder is None:
            from chdb import session

            self._decoder = session.Session()  # in memory: only decodes, stores nothing
        return self._decoder.query(sql, "ArrowTable")

    def close(self) -> None:
        self.driver.disconnect()
        if self._probe_driver is not None:
            with contextlib.suppress(Exception):
                self._probe_driver.disconnect()
        if self._decoder is not None:
            self._decoder.close()


def is_connection_error(error: BaseException) -> bool:
    """A failure of the connection rather than of the statement (clickhouse-driver's network errors)."""
    from clickhouse_driver import errors

    return isinstance(error, errors.NetworkError | errors.SocketTimeoutError | EOFError | OSError | ConnectionError)


def python_column(column: pa.ChunkedArray) -> list[Any]:
    """Values as clickhouse-driver takes them (maps as dicts; the rest as Arrow gives them)."""
    values = column.to_pylist()
    if pa.types.is_map(column.type):
        return [dict(v) if v is not None else {} for v in values]
    return values


def make_client(settings: ClickHouseSettings) -> ClickHouseClient:
    """The client CLICKHOUSE_CLIENT names: chDB on the local data folder, or the server."""
    if settings.clickhouse_client == "chdb":
        return ChdbClient(settings.clickhouse_chdb_path)
    return NativeClient(
        settings.clickhouse_host,
        settings.clickhouse_port,
        settings.clickhouse_user,
        settings.clickhouse_password.get_secret_value(),
        settings.clickhouse_secure,
    )


class QueryFailed(RuntimeError):
    pass


def _from_sink(url: str, name: str, timeout: float) -> queries.Result | None:
    """The result from a running sink, or None when no sink answers at `url`."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/query?name={name}", timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", error.reason)
        raise QueryFailed(f"the sink at {url} answered {error.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return queries.Result(body["name"], body["title"], body["columns"], body["rows"])


def run_query(settings: ClickHouseSettings, name: str, timeout: float = 30.0) -> queries.Result:
    """The named query `name`: from the server (native), else from a running sink, else from the chDB folder."""
    if name not in queries.QUERIES:
        raise QueryFailed(f"unknown query {name!r}; known: {', '.join(queries.QUERIES)}")
    db = settings.clickhouse_database
    if settings.clickhouse_client == "native":
        client = make_client(settings)
        try:
            return queries.run(name, client.rows, db)
        finally:
            client.close()
    result = _from_sink(settings.query_url(), name, timeout)
    if result is not None:
        return result
    path = settings.clickhouse_chdb_path
    if not path.exists():
        raise QueryFailed(f"no ClickHouse data at {path} yet (has the sink run? CLICKHOUSE_CHDB_PATH)")
    try:
        local = ChdbClient(path)
    except StoreLocked as error:
        raise QueryFailed(
            f"{error}, and no sink answers at {settings.query_url()}: set CLICKHOUSE_SINK_QUERY_URL to its query port"
        ) from None
    try:
        return queries.run(name, local.rows, db)
    except Exception as error:
        raise QueryFailed(f"query {name} on {path}: {error}") from error
    finally:
        local.close()
