"""`python -m services.archiver [COMMAND]`: the archiver service and its maintenance tools.

    run                          the service (the default): Kafka -> Iceberg, one commit per table
    init                         create the tables, or evolve them to the current Avro contracts
    evolve [--check]             show (and with --check only show) the schema changes the contracts need
    stats [--distinct T.COL]     rows, files and snapshots per table, as JSON (the run summary reads it)
    history TABLE [--limit N]    the table's snapshots, newest first, as JSON lines
    compact TABLE|all [--dry-run] [--min-files N] [--small-file-mb N]
    expire TABLE|all [--older-than 7d] [--retain-last 10] [--dry-run]
    remove-orphans TABLE|all [--older-than 3d|TIME] [--dry-run] [--allow-recent]
                                 delete files no snapshot or metadata file references (crashed commits)
    read TABLE [--snapshot-id ID | --as-of TIME] [--where EXPR] [--columns a,b] [--limit N] [--count]
    replay TABLE --since TIME --until TIME [--where EXPR] [--into TOPIC] [--snapshot-id ID | --as-of TIME]
                 [--dry-run]

TABLE is user_events, transactions or dead_letters. TIME is ISO 8601 (UTC if no offset). EXPR is a pyiceberg
row filter, e.g. "event_type = 'purchase' AND country = 'DE'". Configuration comes from the environment
(docs/archiver.md); the tools need the catalog variables, `replay` also KAFKA_BOOTSTRAP_SERVERS.
Exit codes: 0 ok, 1 failed (message on stderr), 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from services.kit.config import ConfigError, load_settings
from services.kit.durations import parse_duration
from services.kit.exits import ExitCode

log = logging.getLogger("services.archiver")

TABLES = ("user_events", "transactions", "dead_letters")


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _cutoff(text: str) -> datetime:
    """An age (`3d`, `90m`, seconds) before now, or a point in time (ISO 8601)."""
    try:
        return datetime.now(UTC) - parse_duration(text, unitless_seconds=True)
    except ValueError:
        pass
    try:
        return _time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an age (e.g. 3d, 12h) or an ISO 8601 time: {text!r}") from None


def _print(payload: Any) -> None:
    print(json.dumps(payload, default=str, sort_keys=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.archiver", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="the service (default)")
    sub.add_parser("init", help="create or evolve the tables")
    evolve = sub.add_parser("evolve", help="schema changes the contracts need")
    evolve.add_argument("--check", action="store_true", help="only show; exit 1 if a change is breaking")
    stats = sub.add_parser("stats", help="rows/files/snapshots per table as JSON")
    stats.add_argument(
        "--distinct", action="append", default=[], metavar="TABLE.COLUMN",
        help="also count rows whose COLUMN value is not unique (e.g. user_events.event_id)",
    )  # fmt: skip
    hist = sub.add_parser("history", help="snapshots of a table")
    hist.add_argument("table", choices=TABLES)
    hist.add_argument("--limit", type=int, default=None)
    comp = sub.add_parser("compact", help="rewrite small files")
    comp.add_argument("table", choices=(*TABLES, "all"))
    comp.add_argument("--dry-run", action="store_true")
    comp.add_argument("--min-files", type=int, default=2, help="rewrite a partition from this many small files")
    comp.add_argument("--small-file-mb", type=float, default=None, help="default: 3/4 of the target file size")
    exp = sub.add_parser("expire", help="expire old snapshots and delete the files only they used")
    exp.add_argument("table", choices=(*TABLES, "all"))
    exp.add_argument("--older-than", default="7d", help="age of the snapshots to expire (default 7d)")
    exp.add_argument("--retain-last", type=int, default=10, help="always keep this many newest (default 10)")
    exp.add_argument("--dry-run", action="store_true")
    orphans = sub.add_parser("remove-orphans", help="delete files that no snapshot or metadata file references")
    orphans.add_argument("table", nargs="?", choices=(*TABLES, "all"), metavar="TABLE", help="a table or all")
    orphans.add_argument("--table", dest="table_option", choices=(*TABLES, "all"), help="same as TABLE")
    orphans.add_argument(
        "--older-than", type=_cutoff, default="3d",
        help="only files last modified before this age (3d, 12h) or time (ISO 8601); default 3d, at least 1h",
    )  # fmt: skip
    orphans.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")
    orphans.add_argument(
        "--allow-recent", action="store_true",
        help="accept a cut-off less than 1h ago: only while no archiver, compact or expire is running",
    )  # fmt: skip
    for name, helptext in (("read", "time-travel read"), ("replay", "re-emit a time range into Kafka")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("table", choices=TABLES)
        which = p.add_mutually_exclusive_group()
        which.add_argument("--snapshot-id", type=int, default=None)
        which.add_argument("--as-of", type=_time, default=None, help="the snapshot current at this time")
        p.add_argument("--where", default=None, help="pyiceberg row filter")
    read = sub.choices["read"]
    read.add_argument("--columns", default="*", help="comma list (default all)")
    read.add_argument("--limit", type=int, default=20)
    read.add_argument("--count", action="store_true", help="print only the number of rows")
    replay = sub.choices["replay"]
    replay.add_argument("--since", type=_time, required=True, help="event time from (inclusive)")
    replay.add_argument("--until", type=_time, required=True, help="event time to (exclusive)")
    replay.add_argument("--into", default=None, help="target topic (default: where each row came from)")
    replay.add_argument("--replay-id", default=None)
    replay.add_argument("--dry-run", action="store_true", help="count, produce nothing")
    return parser


def _tools(args: argparse.Namespace) -> int:
    from pyiceberg.exceptions import NoSuchTableError

    from services.kit.avro import SchemaRepository
    from services.stores.iceberg import load_table, open_catalog

    from .catalog import ensure_table
    from .maintenance import NoSuchSnapshot, OrphanCheckError, archive_stats, compact, expire, history, read
    from .schemas import BreakingSchemaChange, default_tables, fields_with_default, plan_evolution
    from .settings import ArchiverCommandSettings, ArchiverSettings

    if args.command == "remove-orphans":
        problem = _orphan_arguments(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return ExitCode.CONFIG
    settings = load_settings(ArchiverCommandSettings)
    catalog = open_catalog(settings)
    repository = SchemaRepository.load()
    specs = {spec.name: spec for spec in default_tables()}
    chosen = TABLES if getattr(args, "table", None) == "all" else (getattr(args, "table", None),)
    try:
        if args.command == "init":
            target = ArchiverSettings.model_fields["archiver_target_file_size_bytes"].default
            for name in TABLES:
                _, plan = ensure_table(catalog, settings, specs[name], repository, target)
                _print({"table": name, "changes": plan.describe()})
            return ExitCode.OK
        if args.command == "evolve":
            breaking = False
            for name in TABLES:
                spec = specs[name]
                try:
                    table = load_table(catalog, settings, name)
                except NoSuchTableError:
                    _print({"table": name, "changes": ["create"], "problems": []})
                    continue
                definition = repository[spec.subject].definition if spec.subject else None
                plan = plan_evolution(table.schema(), spec.schema(repository), fields_with_default(definition))
                breaking = breaking or bool(plan.problems)
                _print({"table": name, "changes": plan.describe(), "problems": plan.problems})
                if not args.check and not plan.problems and plan.changes:
                    ensure_table(catalog, settings, spec, repository)
            return ExitCode.FAILED if breaking else ExitCode.OK
        if args.command == "stats":
            distinct = dict(item.split(".", 1) for item in args.distinct)
            _print(archive_stats(catalog, settings, TABLES, distinct))
            return ExitCode.OK
        if args.command == "history":
            for entry in history(load_table(catalog, settings, args.table), args.limit):
                _print(entry)
            return ExitCode.OK
        if args.command == "compact":
            small = int(args.small_file_mb * 1024 * 1024) if args.small_file_mb else None
            for name in chosen:
                table = load_table(catalog, settings, name)
                _print(compact(table, small_file_bytes=small, min_files=args.min_files, dry_run=args.dry_run).as_dict())
            return ExitCode.OK
        if args.command == "expire":
            cutoff = datetime.now(UTC) - parse_duration(args.older_than, unitless_seconds=True)
            for name in chosen:
                table = load_table(catalog, settings, name)
                _print(expire(table, cutoff, args.retain_last, args.dry_run).as_dict())
            return ExitCode.OK
        if args.command == "remove-orphans":
            from .maintenance import remove_orphans

            failed = 0
            for name in chosen:  # `chosen` from args.table, which _orphan_arguments filled in
                table = load_table(catalog, settings, name)
                report = remove_orphans(table, args.older_than, args.dry_run, allow_recent=args.allow_recent)
                _print(report.as_dict())
                if report.failed:
                    print(f"error: {name}: {len(report.failed)} orphans could not be deleted", file=sys.stderr)
                    failed += 1
            return ExitCode.FAILED if failed else ExitCode.OK
        if args.command == "read":
            table = load_table(catalog, settings, args.table)
            columns = tuple(c.strip() for c in args.columns.split(",") if c.strip()) or ("*",)
            data = read(
                table,
                snapshot_id=args.snapshot_id,
                as_of=args.as_of,
                row_filter=args.where or "True",
                columns=columns,
                limit=None if args.count else args.limit,
            )
            if args.count:
                _print({"table": args.table, "rows": data.num_rows})
            else:
                for row in data.to_pylist():
                    _print(row)
            return ExitCode.OK
        if args.command == "replay":
            return _replay(args, settings, catalog, specs[args.table], repository)
    except (NoSuchTableError, NoSuchSnapshot, BreakingSchemaChange, OrphanCheckError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILED
    raise AssertionError(args.command)


def _orphan_arguments(args: argparse.Namespace) -> str | None:
    """Checks `remove-orphans` arguments before any catalog is opened (the problem, or None); sets args.table."""
    from .maintenance import ORPHAN_MIN_AGE

    if args.table and args.table_option and args.table != args.table_option:
        return f"two different tables given: {args.table} and --table {args.table_option}"
    args.table = args.table or args.table_option
    if not args.table:
        return f"remove-orphans needs a table: one of {', '.join(TABLES)} or all"
    if args.older_than > datetime.now(UTC) - ORPHAN_MIN_AGE and not args.allow_recent:
        return (
            f"--older-than {args.older_than.isoformat()} is less than {ORPHAN_MIN_AGE} ago: the files of a commit "
            "in flight (written before the catalog commit) would look orphaned. Use an older cut-off, or "
            "--allow-recent while no archiver, compact or expire is running"
        )
    return None


def _replay(args: argparse.Namespace, settings: Any, catalog: Any, spec: Any, repository: Any) -> int:
    from confluent_kafka.admin import AdminClient

    from services.kit.kafka import KafkaProducer, client_config, wait_for_broker
    from services.stores.iceberg import load_table

    from .replay import ReplayError, replay

    if not settings.kafka_bootstrap_servers:
        print("error: KAFKA_BOOTSTRAP_SERVERS must be set for replay", file=sys.stderr)
        return ExitCode.CONFIG
    config = client_config(settings, client_id="lp-archiver-replay")
    wait_for_broker(config, settings.dependency_wait_s)
    # All topics, not one by name: Tansu creates any topic a metadata request names.
    metadata = AdminClient(dict(config)).list_topics(timeout=10).topics
    counts = {name: len(t.partitions) for name, t in metadata.items() if t.error is None}
    producer = None if args.dry_run else KafkaProducer(config)
    try:
        report = replay(
            load_table(catalog, settings, spec.name),
            spec,
            args.since,
            args.until,
            producer=producer,
            repository=repository,
            partitions_of=counts.get,
            into=args.into,
            where=args.where,
            snapshot_id=args.snapshot_id,
            as_of=args.as_of,
            replay_id=args.replay_id,
        )
    except ReplayError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILED
    _print(report.as_dict())
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command in (None, "run"):
        from services.kit.service import main_for

        from .app import ArchiverService
        from .settings import ArchiverSettings

        try:
            return main_for(ArchiverService, ArchiverSettings)
        except ConfigError:
            return ExitCode.CONFIG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _tools(args)
    except ConfigError:
        return ExitCode.CONFIG


if __name__ == "__main__":
    sys.exit(main())
