"""`python -m services.cdc [command]`.

(no command)                     run the CDC service (settings from the environment, see docs/cdc.md)
preflight                        only check and prepare PostgreSQL (Kubernetes init container); exit 0 or 1
slots list                       list the server's replication slots
slots drop-stale [--older-than 1h] [--dry-run]
                                 drop inactive logical slots of this database (never the configured one)
server-properties [--check]      (re)write deploy/debezium/application.properties from the shared set
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cdc.settings import CdcSettings
from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.kit.logs import configure_logging


def _settings(need_kafka: bool = True) -> CdcSettings:

    overrides: dict[str, object] = {}
    if not need_kafka and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        overrides["kafka_bootstrap_servers"] = "unused"  # slots and preflight never talk to Kafka
    return load_settings(CdcSettings, **overrides)


def _run() -> int:
    from services.cdc.app import run_service

    settings = _settings()
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    return run_service(settings)


def _preflight() -> int:
    """The Kubernetes init container of Debezium Server: the same checks, from the same variables (CDC_TABLES,
    CDC_SLOT_NAME, CDC_PUBLICATION_NAME fill the property set's placeholders in both runtimes)."""
    import logging

    from services.cdc.preflight import PreflightError, run_preflight

    settings = _settings(need_kafka=False)
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    log = logging.getLogger(settings.service_name)
    try:
        report = run_preflight(
            settings.postgres_dsn.get_secret_value(),
            settings.tables,
            settings.cdc_publication_name,
            settings.cdc_slot_name,
        )
    except PreflightError as error:
        log.error("preflight failed: %s", error, extra={"preflight": "failed"})
        return ExitCode.FAILED
    log.info("preflight passed", extra={"report": report.__dict__})
    return ExitCode.OK


def _slots(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from services.cdc.preflight import PreflightError, connect
    from services.cdc.slots import drop_slot, format_slots, list_slots, parse_duration, stale_slots

    settings = _settings(need_kafka=False)
    try:
        older_than = parse_duration(args.older_than) if args.action == "drop-stale" else timedelta(0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        with connect(settings.postgres_dsn.get_secret_value(), application_name="lp-cdc-slots") as conn:
            slots = list_slots(conn)
            if args.action == "list":
                print(format_slots(slots, own_slot=settings.cdc_slot_name))
                return ExitCode.OK
            chosen = stale_slots(slots, database=conn.info.dbname, older_than=older_than, keep=[settings.cdc_slot_name])
            if not chosen:
                print(f"no stale slot (inactive logical slots of {conn.info.dbname!r} older than {args.older_than})")
                return ExitCode.OK
            print(format_slots(chosen))
            if args.dry_run:
                print(f"dry run: would drop {len(chosen)} slot(s)")
                return ExitCode.OK
            failed = 0
            for slot in chosen:
                problem = drop_slot(conn, slot.name)
                print(f"dropped {slot.name}" if problem is None else f"kept {slot.name}: {problem}")
                failed += problem is not None
            return ExitCode.FAILED if failed else ExitCode.OK
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILED


def _server_properties(args: argparse.Namespace) -> int:
    from services.cdc.connector import default_properties_path, server_properties, server_properties_path

    rendered = server_properties(default_properties_path().read_text(encoding="utf-8"))
    target = Path(args.output) if args.output else server_properties_path()
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if args.check:
        if current != rendered:
            print(f"{target} is out of date: run python -m services.cdc server-properties", file=sys.stderr)
            return ExitCode.FAILED
        print(f"{target} is up to date")
        return ExitCode.OK
    if current != rendered:
        target.write_text(rendered, encoding="utf-8")
        print(f"wrote {target}")
    else:
        print(f"{target} unchanged")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cdc", description="PostgreSQL change data capture")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the service (the default)")
    commands.add_parser("preflight", help="check and prepare PostgreSQL, then exit")
    slots = commands.add_parser("slots", help="list or drop replication slots")
    slots.add_argument("action", choices=["list", "drop-stale"])
    slots.add_argument("--older-than", default="1h", help="inactive at least this long (30m, 2h, 1d; default 1h)")
    slots.add_argument("--dry-run", action="store_true", help="only show what would be dropped")
    server = commands.add_parser("server-properties", help="render deploy/debezium/application.properties")
    server.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    server.add_argument("--output", help="write here instead")
    args = parser.parse_args(argv)
    if args.command in (None, "run"):
        return _run()
    if args.command == "preflight":
        return _preflight()
    if args.command == "slots":
        return _slots(args)
    return _server_properties(args)


if __name__ == "__main__":
    sys.exit(main())
