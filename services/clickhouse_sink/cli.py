"""`python -m services.clickhouse_sink query NAME`: print a live view (funnel, revenue, top-products, ...).

Locally (chDB) the running sink owns the data folder, so the command asks it over its query port; with no sink
running it opens the folder itself. Against a ClickHouse server it queries the server. `counts` prints rows
per table as JSON (the run summary's input); `--json` gives any result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.stores import clickhouse_queries as queries
from services.stores.clickhouse import ClickHouseSettings, QueryFailed, run_query


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
