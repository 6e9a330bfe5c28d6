"""What the services serve on /metrics, and the metric and label names a PromQL expression uses.

Shared by the alert-rule and the dashboard checks (test_alert_metrics.py, test_dashboards.py): both assert that
nothing they query points at a metric no service serves. The fixtures over these live in conftest.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from datetime import date

from prometheus_client.parser import text_string_to_metric_families

from services.reconcile import metrics as reconcile_metrics
from services.reconcile.compare import Figures, compare
from tests.unit.deploy.test_manifests_valid import REPO_ROOT

SERVE_EVERY_SERVICE_REGISTRY = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import services
    for module in pkgutil.walk_packages(services.__path__, "services."):
        if module.name.endswith("__main__") or module.name.startswith(("services.testing", "services.stack")):
            continue  # entry points run on import; testing and stack are not services
        importlib.import_module(module.name)
    import json
    from prometheus_client import REGISTRY
    from services.kit.health import Health, HealthServer
    from services.kit.lag import LABELS, LAG_RECORDS, LAG_SECONDS
    # label names each family is declared with (a family without samples yet shows none on /metrics)
    labels = {LAG_RECORDS: LABELS, LAG_SECONDS: LABELS}
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:
            labels.setdefault(name, list(getattr(collector, "_labelnames", ())))
    server = HealthServer(Health(), 0).start()
    print(json.dumps({"port": server.port, "labels": labels}), flush=True)
    sys.stdin.read()  # until the test closes it
    """
)

# PromQL words that look like metric names in an expression.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
FUNCTIONS_OR_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: identifiers outside label matchers, strings, grouping clauses
    and ranges, not followed by `(` (functions, aggregations), not operators or keywords."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = FUNCTIONS_OR_GROUPING.sub(" ", stripped)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", stripped):
        word = match.group(1)
        if word not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", word):
            names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by (selectors, by/on/ignoring lists)."""
    found = {m.group(1) for m in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", expr)}
    for clause in re.finditer(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        found |= {name.strip() for name in clause.group(1).split(",") if name.strip()}
    return found


Served = dict[str, tuple[str, set[str]]]  # sample name -> (family type, label names)
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}


def exposed(text: str, declared: dict[str, list[str]] | None = None) -> Served:
    """The sample names Prometheus stores from an exposition text, with their family's label names: from the
    samples, or for a family without samples yet (it still has HELP and TYPE lines) from `declared`."""
    out: Served = {}
    for family in text_string_to_metric_families(text):
        labels = {name for sample in family.samples for name in sample.labels} - {"le", "quantile"}
        labels |= set((declared or {}).get(family.name, ()))
        for suffix in SUFFIXES.get(family.type, [""]):
            out[family.name + suffix] = (family.type, labels)
    return out


def serve_every_service_registry() -> Served:
    """What a scrape of every service would store: a child process imports every service module (each registers
    its metrics in the default registry at import, as the running service does) and serves that registry with the
    kit's `HealthServer`; this scrapes it over HTTP."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_EVERY_SERVICE_REGISTRY],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        started = json.loads(process.stdout.readline())
        with urllib.request.urlopen(f"http://127.0.0.1:{started['port']}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=30)
    return exposed(text, started["labels"])


def reconcile_pushed_metrics() -> Served:
    """The reconciliation is a batch job that pushes its metrics: its registry, built from a real comparison."""
    day = date(2026, 11, 2)
    report = compare(
        {"clickhouse": {(day, "purchase"): Figures(1, 1.0)}, "iceberg": {(day, "purchase"): Figures(1, 1.0)}}
    )
    registry = reconcile_metrics.build_registry(report, ("clickhouse", "iceberg"), {}, 1.0, 1.0)
    return exposed(reconcile_metrics.text(registry))
