"""`python -m services.reconcile`: compare events and revenue per UTC day and event type across the stores.

Prints a table (day, event type, events and revenue per store, status) and a verdict line, or JSON with --json.
Settings come from the environment (docs/reconciliation.md); options override RECONCILE_* variables.
Exit codes: 0 the stores agree, 1 they disagree beyond the tolerance, 2 bad configuration or a store that cannot
be read (named in the message).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from services.kit.config import ConfigError, settings_from
from services.kit.exits import ExitCode

from . import metrics
from .runner import Outcome, run
from .settings import ReconcileSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.reconcile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--since", help="first UTC day of event time: YYYY-MM-DD, today, yesterday or -Nd (=-7d)")
    parser.add_argument("--until", help="last UTC day of event time, inclusive (same forms)")
    parser.add_argument("--stores", help="comma list of at least two of clickhouse, iceberg, snowflake")
    parser.add_argument("--min-consistency", type=float, help="override RECONCILE_MIN_CONSISTENCY (e.g. 0.999)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--differences", action="store_true", help="print only the cells that differ")
    parser.add_argument("--metrics-file", type=Path, help="write the metrics here (textfile collector format)")
    return parser


def _export(outcome: Outcome, settings: ReconcileSettings, metrics_file: Path | None) -> None:
    registry = metrics.build_registry(
        outcome.report, outcome.stores, outcome.store_up, outcome.finished_at, outcome.duration_s
    )
    path = metrics_file or settings.reconcile_metrics_file
    if path is not None:
        metrics.write_textfile(registry, path)
    if settings.reconcile_pushgateway_url:
        try:
            metrics.push(registry, settings.reconcile_pushgateway_url, settings.reconcile_pushgateway_job)
        except OSError as error:  # the verdict stands; a missing push shows as a stale timestamp
            print(f"warning: could not push metrics to {settings.reconcile_pushgateway_url}: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = dict(os.environ)
    if args.min_consistency is not None:
        env["RECONCILE_MIN_CONSISTENCY"] = str(args.min_consistency)
    try:
        settings = settings_from(ReconcileSettings, env)
        outcome = run(env, args.since, args.until, args.stores)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    _export(outcome, settings, args.metrics_file)
    if outcome.report is None:
        for store, message in outcome.errors.items():
            print(f"error: store {store} could not be read: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"agrees": None, "errors": outcome.errors}))
        return ExitCode.NO_VERDICT
    report = outcome.report
    if args.json:
        print(json.dumps(report.as_dict() | {"duration_s": round(outcome.duration_s, 3)}))
    else:
        print(report.render(only_differences=args.differences))
    return ExitCode.OK if report.agrees else ExitCode.FAILED  # FAILED: the stores disagree


if __name__ == "__main__":
    sys.exit(main())
