"""`python -m services.clickhouse_sink query NAME`: print a live view (funnel, revenue, top-products, ...).

Locally (chDB) the running sink owns the data folder, so the command asks it over its query port; with no sink
running it opens the folder itself. Against a ClickHouse server it queries the server. `counts` prints rows
per table as JSON (the run summary's input); `--json` gives any result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from services.clickhouse_sink import queries
from services.clickhouse_sink.client import ChdbClient, NativeClient, StoreLocked
from services.clickhouse_sink.settings import ClickHouseSettings
from services.kit.config import load_settings
from services.kit.exits import ExitCode


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
    if name not in queries.QUERIES:
        raise QueryFailed(f"unknown query {name!r}; known: {', '.join(queries.QUERIES)}")
    db = settings.clickhouse_database
    if settings.clickhouse_client == "native":
        client = NativeClient(
            settings.clickhouse_host,
            settings.clickhouse_port,
            settings.clickhouse_user,
            settings.clickhouse_password,
            settings.clickhouse_secure,
        )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.clickhouse_sink query", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", choices=list(queries.QUERIES), help="which live view")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    settings = load_settings(ClickHouseSettings)
    try:
        result = run_query(settings, args.name)
    except QueryFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILED
    if args.name == "counts" and not args.json:
        print(json.dumps(queries.counts_dict(result), indent=2))
    elif args.json:
        print(json.dumps(result.as_dict(), default=str))
    else:
        print(queries.render_text(result))
    return ExitCode.OK
