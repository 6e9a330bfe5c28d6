"""Every metric an alert rule uses is served on /metrics by the code that registers it: no alert points at nothing.

A child process imports every service module (each registers its metrics in the default registry at import, as
the running service does), serves that registry with the kit's `HealthServer` (the /metrics every service runs)
and this test scrapes it over HTTP and parses the exposition. Label values appear only once a service counts
something, so the check is on metric names and types, and on the label names an alert groups or matches by.
The reconciliation is a batch job that pushes its metrics to a Pushgateway: its registry is built from a real
comparison and parsed the same way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from datetime import date
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.reconcile import metrics as reconcile_metrics
from services.reconcile.compare import Figures, compare
from tests.unit.deploy.test_alert_rules import OBSERVABILITY_DOC, RULES_FILE, alert_rules
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


@pytest.fixture(scope="module")
def service_metrics() -> Served:
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


@pytest.fixture(scope="module")
def reconcile_pushed() -> Served:
    day = date(2026, 11, 2)
    report = compare(
        {"clickhouse": {(day, "purchase"): Figures(1, 1.0)}, "iceberg": {(day, "purchase"): Figures(1, 1.0)}}
    )
    registry = reconcile_metrics.build_registry(report, ("clickhouse", "iceberg"), {}, 1.0, 1.0)
    return exposed(reconcile_metrics.text(registry))


def test_the_rule_parser_finds_metric_names_and_nothing_else():
    expr = (
        'time() - max by (table) (lp_a_seconds) > 900 or (sum by (table) (increase(lp_b_total{x="y"}[15m])) >= 3 '
        "unless on (table) lp_c) and rate(lp_d_total[1h] offset 5m) > 3 * absent(lp_e)"
    )
    assert metric_names(expr) == {"lp_a_seconds", "lp_b_total", "lp_c", "lp_d_total", "lp_e"}
    assert label_names(expr) == {"table", "x"}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_metric_an_alert_uses_is_served_with_the_labels_it_uses(
    rule: dict[str, Any], service_metrics: Served, reconcile_pushed: Served
):
    names = metric_names(rule["expr"])
    assert names, rule["expr"]
    served = service_metrics | reconcile_pushed
    missing = sorted(name for name in names if name not in served)
    assert not missing, f"{rule['alert']} uses metrics no service serves: {missing}"
    # Labels it matches or groups by belong to its metrics (Prometheus adds job and instance when scraping).
    known = set().union(*(served[name][1] for name in names)) | {"job", "instance"}
    assert label_names(rule["expr"]) <= known, f"{rule['alert']}: labels no metric of it has"


def test_the_rules_file_is_one_yaml_document_with_groups():
    document = yaml.safe_load(RULES_FILE.read_text())
    assert set(document) == {"groups"}


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """docs/observability.md's metrics table: name -> (type, labels)."""
    rows = re.findall(r"^\| `(lp_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", OBSERVABILITY_DOC.read_text(), re.MULTILINE)
    return {name: (kind, {label.strip() for label in labels.split(",")} - {"-", ""}) for name, kind, labels in rows}


def test_the_metrics_table_lists_every_metric_served_with_its_type_and_labels(
    service_metrics: Served, reconcile_pushed: Served
):
    served: dict[str, tuple[str, set[str]]] = {}
    for name, (kind, labels) in (service_metrics | reconcile_pushed).items():
        if name.startswith("lp_") and not name.endswith("_created"):  # prometheus_client's creation times
            served[re.sub(r"_(bucket|sum|count)$", "", name) if kind == "histogram" else name] = (kind, labels)
    documented = documented_metrics()
    assert sorted(set(served) - set(documented)) == [], "served but not in docs/observability.md"
    assert sorted(set(documented) - set(served)) == [], "documented but served by nothing"
    wrong = {name: (documented[name], served[name]) for name in served if documented[name] != served[name]}
    assert wrong == {}, "type or labels differ (documented, served)"
