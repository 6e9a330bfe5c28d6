"""CLI: ``python -m services.declarations {apply,manifests,schema-check}`` (also installed as ``lp-declarations``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from services.declarations.apply import DECLARATIONS_DIR, apply_declarations
from services.declarations.manifests import FIX_HINT, ManifestError, sync_manifests
from services.declarations.resources import DeclarationError
from services.declarations.schema_check import check_schemas
from services.kit.exits import ExitCode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lp-declarations", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser("apply", help="register the declared schemas and reconcile the declared topics")
    apply.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)",
    )
    apply.add_argument("--dir", type=Path, default=DECLARATIONS_DIR, help="declarations directory (%(default)s)")
    apply.add_argument("--timeout", type=float, default=30.0, help="seconds per Kafka operation (%(default)s)")
    apply.add_argument(
        "--cap-replication-factor",
        action="store_true",
        help="lower replication factors to the number of brokers (single-broker dev clusters only)",
    )

    manifests = commands.add_parser("manifests", help="generate the EventSchema CRs from schemas/avro/*.avsc")
    manifests.add_argument("--check", action="store_true", help="only check they are in sync (CI)")
    manifests.add_argument("--root", type=Path, default=Path("."), help="repository root (%(default)s)")

    schema_check = commands.add_parser(
        "schema-check", help="check schemas/avro/*.avsc against a git revision with each subject's mode"
    )
    schema_check.add_argument("--against", help="git revision (default: merge-base with origin/main, else HEAD)")
    schema_check.add_argument("--root", type=Path, default=Path("."), help="repository root (%(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "apply":
        return _apply(args)
    if args.command == "manifests":
        return _manifests(args)
    return _schema_check(args)


def _apply(args: argparse.Namespace) -> int:
    if not args.bootstrap:
        print("apply: --bootstrap (or $KAFKA_BOOTSTRAP_SERVERS) is required", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        report = apply_declarations(
            args.dir, args.bootstrap, timeout=args.timeout, cap_replication_factor=args.cap_replication_factor
        )
    except DeclarationError as error:
        print(error, file=sys.stderr)
        return ExitCode.FAILED
    print(report.table())
    return ExitCode.OK if report.ok else ExitCode.FAILED


def _manifests(args: argparse.Namespace) -> int:
    try:
        report = sync_manifests(args.root, check=args.check)
    except ManifestError as error:
        print(f"manifests: {error}", file=sys.stderr)
        return ExitCode.FAILED
    if args.check:
        if report.in_sync:
            print(f"manifests: {len(report.unchanged)} generated file(s) in sync")
            return ExitCode.OK
        print("manifests are out of sync:", *report.out_of_sync, f"-> {FIX_HINT}", sep="\n  ", file=sys.stderr)
        return ExitCode.FAILED
    for label, paths in (("wrote", report.written), ("removed", report.removed)):
        for path in paths:
            print(f"manifests: {label} {path.relative_to(args.root) if path.is_relative_to(args.root) else path}")
    print(f"manifests: {len(report.written)} written, {len(report.removed)} removed, {len(report.unchanged)} unchanged")
    return ExitCode.OK


def _schema_check(args: argparse.Namespace) -> int:
    report = check_schemas(args.root, args.against)
    print(report.render())
    return ExitCode.OK if report.ok else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
