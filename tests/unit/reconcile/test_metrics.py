"""The metrics: names and values in the text file, an atomic write, and a real HTTP push to a Pushgateway API."""

from __future__ import annotations

import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.reconcile import metrics
from services.reconcile.compare import Figures, compare

D = date(2026, 11, 2)
STORES = ("clickhouse", "iceberg", "snowflake")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def report():
    full = {(D, "purchase"): Figures(10, 100.0), (D, "login"): Figures(990, 0.0)}
    short = {(D, "purchase"): Figures(9, 90.0), (D, "login"): Figures(990, 0.0)}
    return compare({"clickhouse": short, "iceberg": full, "snowflake": full})


def test_the_text_file_carries_verdict_consistency_and_per_store_figures(tmp_path: Path):
    path = tmp_path / "textfile" / "reconcile.prom"
    registry = metrics.build_registry(report(), STORES, dict.fromkeys(STORES, True), 1_800_000_000.0, 2.5)
    metrics.write_textfile(registry, path)
    values = samples(path.read_text())
    assert values[("lp_reconcile_agrees", ())] == 0.0
    assert values[("lp_reconcile_success", ())] == 1.0
    assert values[("lp_reconcile_events_consistency_ratio", ())] == 999 / 1000
    assert values[("lp_reconcile_revenue_consistency_ratio", ())] == 0.9
    assert values[("lp_reconcile_consistency_ratio", ())] == 0.9
    assert values[("lp_reconcile_min_consistency_ratio", ())] == 0.999
    assert values[("lp_reconcile_cells", (("status", "events"),))] == 1.0
    assert values[("lp_reconcile_cells", (("status", "ok"),))] == 1.0
    assert values[("lp_reconcile_events", (("store", "clickhouse"),))] == 999.0
    assert values[("lp_reconcile_revenue", (("store", "iceberg"),))] == 100.0
    assert values[("lp_reconcile_missing_events", (("store", "clickhouse"),))] == 1.0
    assert values[("lp_reconcile_missing_events", (("store", "snowflake"),))] == 0.0
    assert values[("lp_reconcile_differing_cells", (("status", "events"), ("store", "clickhouse")))] == 1.0
    assert values[("lp_reconcile_differing_cells", (("status", "events"), ("store", "iceberg")))] == 0.0
    assert values[("lp_reconcile_store_up", (("store", "snowflake"),))] == 1.0
    assert values[("lp_reconcile_last_run_timestamp_seconds", ())] == 1_800_000_000.0
    assert [p.name for p in path.parent.iterdir()] == ["reconcile.prom"]  # no temporary file left behind


def test_a_store_that_could_not_be_read_exports_up_and_timing_only():
    up = {"clickhouse": True, "iceberg": False, "snowflake": True}
    values = samples(metrics.text(metrics.build_registry(None, STORES, up, 1.0, 0.5)))
    assert values[("lp_reconcile_store_up", (("store", "iceberg"),))] == 0.0
    assert values[("lp_reconcile_success", ())] == 0.0
    assert not any(name == "lp_reconcile_agrees" for name, _ in values)


def test_the_push_replaces_the_jobs_group_on_the_gateway():
    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        registry = metrics.build_registry(report(), STORES, dict.fromkeys(STORES, True), 1.0, 0.5)
        metrics.push(registry, f"http://127.0.0.1:{server.server_address[1]}", "lp-reconcile")
    finally:
        server.shutdown()
        server.server_close()
    ((method, path, body),) = received
    assert (method, path) == ("PUT", "/metrics/job/lp-reconcile")
    assert b"lp_reconcile_agrees 0.0" in body
