"""The reconciliation's result as Prometheus metrics: a text file (node-exporter textfile collector) and a push.

A run is a batch job, so nothing is scraped from it: the CronJob pushes to a Pushgateway, a host writes the file
where its node exporter's textfile collector reads it. Low cardinality on purpose: per store and per status,
never per day (the differing cells are in the printed table and the JSON).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway

from .compare import Report, store_counts

STATUSES = ("ok", "missing", "events", "duplicates", "revenue")


def build_registry(
    report: Report | None,
    stores: tuple[str, ...],
    store_up: Mapping[str, bool],
    finished_at: float,
    duration_s: float,
) -> CollectorRegistry:
    """The run's metrics; `report` is None when a store could not be read (then only up/timing are set)."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    up = gauge("lp_reconcile_store_up", "1 if the store could be read in the last run.", ("store",))
    for store in stores:
        up.labels(store).set(1 if store_up.get(store, False) else 0)
    gauge("lp_reconcile_last_run_timestamp_seconds", "When the last run finished (Unix time).").set(finished_at)
    gauge("lp_reconcile_duration_seconds", "How long the last run took.").set(duration_s)
    gauge("lp_reconcile_success", "1 if the last run could compare all its stores.").set(report is not None)
    if report is None:
        return registry
    gauge("lp_reconcile_agrees", "1 if the stores agree within the minimum consistency.").set(report.agrees)
    gauge("lp_reconcile_consistency_ratio", "The lowest of events, rows and revenue consistency.").set(
        report.consistency
    )
    gauge("lp_reconcile_events_consistency_ratio", "Sum over cells of min/max events.").set(report.events_consistency)
    gauge("lp_reconcile_rows_consistency_ratio", "Sum over cells of min events / max rows.").set(
        report.rows_consistency
    )
    gauge("lp_reconcile_revenue_consistency_ratio", "Sum over cells of agreed/max revenue.").set(
        report.revenue_consistency
    )
    gauge("lp_reconcile_min_consistency_ratio", "The configured minimum consistency.").set(report.min_consistency)
    cells = gauge("lp_reconcile_cells", "(day, event type) cells compared, by status.", ("status",))
    for status in STATUSES:
        cells.labels(status).set(sum(c.status == status for c in report.cells))
    events = gauge("lp_reconcile_events", "Distinct events in the window, per store.", ("store",))
    rows = gauge("lp_reconcile_rows", "Rows in the window, per store (one per event when exact).", ("store",))
    duplicates = gauge("lp_reconcile_duplicate_rows", "Rows beyond one per event in the window, per store.", ("store",))
    revenue = gauge("lp_reconcile_revenue", "Revenue (sum of amount) in the window, per store.", ("store",))
    for store, figures in report.totals().items():
        events.labels(store).set(figures.events)
        rows.labels(store).set(figures.rows)
        duplicates.labels(store).set(figures.duplicates)
        revenue.labels(store).set(round(figures.revenue, 2))
    short = gauge(
        "lp_reconcile_missing_events", "Per store: events fewer than the fullest store, summed over cells.", ("store",)
    )
    for store in report.stores:
        short.labels(store).set(
            sum(c.max_events - (c.figures[store].events if c.figures[store] else 0) for c in report.cells)  # type: ignore[union-attr]
        )
    differing = gauge(
        "lp_reconcile_differing_cells", "Cells in which this store is the one that differs.", ("store", "status")
    )
    per_store = store_counts(report)
    for store in report.stores:
        for status in STATUSES[1:]:
            differing.labels(store, status).set(per_store[store][status])
    return registry


def text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def write_textfile(registry: CollectorRegistry, path: Path) -> None:
    """Atomically (write then rename), so a collector never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text(registry))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def push(registry: CollectorRegistry, url: str, job: str, timeout_s: float = 10.0) -> None:
    """Replace this job's group on the Pushgateway (PUT), so a store that vanished leaves no stale series."""
    push_to_gateway(url, job=job, registry=registry, timeout=timeout_s)
