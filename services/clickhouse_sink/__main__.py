"""`python -m services.clickhouse_sink`: run the sink service; `... query NAME`: print a live view."""

import sys

from services.clickhouse_sink.app import ClickHouseSinkService
from services.clickhouse_sink.settings import ClickHouseSinkSettings
from services.kit.exits import ExitCode
from services.kit.service import main_for


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "query":
        from services.clickhouse_sink.cli import main as query_main

        return query_main(args[1:])
    if args:
        print("usage: python -m services.clickhouse_sink [query NAME [--json]]", file=sys.stderr)
        return ExitCode.CONFIG
    return main_for(ClickHouseSinkService, ClickHouseSinkSettings)


if __name__ == "__main__":
    sys.exit(main())
