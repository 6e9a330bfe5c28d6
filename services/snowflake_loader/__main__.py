"""`python -m services.snowflake_loader [COMMAND]`: the Snowflake loader service and its one-shot commands.

    run        the service (the default): every SNOWFLAKE_LOADER_INTERVAL_S, load new snapshots
    run-once   load what is new now, print a JSON summary; exit 0, or 1 if a table failed
    migrate    apply the DDL migrations, print the versions applied as JSON

Configuration comes from the environment (docs/snowflake-loader.md). Exit codes: 0 ok, 1 failed (message on
stderr), 2 bad configuration, 86 SNOWFLAKE_LOADER_FAIL_AFTER reached (tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from services.kit.config import ConfigError, load_settings
from services.kit.exits import ExitCode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.snowflake_loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="the service (default)")
    sub.add_parser("run-once", help="load what is new, print a JSON summary")
    sub.add_parser("migrate", help="apply the DDL migrations")
    return parser


def _one_shot(command: str) -> int:
    from services.kit.dependencies import DependencyUnavailable
    from services.kit.logs import configure_logging
    from services.kit.tracing import setup_tracing, shutdown_tracing
    from services.stores.iceberg import open_catalog, wait_for_storage
    from services.stores.snowflake import CredentialError, Warehouse, connect, wait_for_warehouse

    from .loader import Loader, migrate
    from .settings import LoaderSettings

    settings = load_settings(LoaderSettings)
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    setup_tracing(
        settings.service_name,
        settings.otel_exporter_otlp_endpoint,
        settings.otel_traces_file,
        settings.otel_sample_ratio,
    )
    logging.getLogger("pyiceberg").setLevel(logging.WARNING)
    try:
        wait_for_warehouse(settings, settings.dependency_wait_s)
        if command != "migrate":
            wait_for_storage(settings, settings.dependency_wait_s)
        warehouse = Warehouse(connect(settings))
    except DependencyUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILED
    except CredentialError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    except Exception as error:
        print(f"error: cannot connect to Snowflake: {type(error).__name__}: {error}", file=sys.stderr)
        return ExitCode.FAILED
    try:
        applied = migrate(warehouse, settings)
        if command == "migrate":
            print(json.dumps({"applied": applied, "database": settings.database}))
            return ExitCode.OK
        results = Loader(settings, warehouse, open_catalog(settings)).run_once()
        ok = all(r.status != "failed" for r in results)
        print(json.dumps({"ok": ok, "tables": {r.table: r.as_dict() for r in results}}, default=str, sort_keys=True))
        return ExitCode.OK if ok else ExitCode.FAILED
    except Exception as error:
        logging.getLogger("services.snowflake_loader").exception("%s failed", command)
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        warehouse.close()
        shutdown_tracing()  # flush the load spans


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command in (None, "run"):
            from services.kit.service import main_for

            from .app import SnowflakeLoaderService
            from .settings import LoaderSettings

            return main_for(SnowflakeLoaderService, LoaderSettings)
        return _one_shot(args.command)
    except ConfigError:
        return ExitCode.CONFIG


if __name__ == "__main__":
    sys.exit(main())
