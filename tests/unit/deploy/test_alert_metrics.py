"""Every metric an alert rule uses is served on /metrics by the code that registers it: no alert points at nothing.

`served_metrics` (the conftest fixtures) starts a child process that imports every service module (each registers
its metrics in the default registry at import, as the running service does), serves that registry with the kit's
`HealthServer` (the /metrics every service runs), scrapes it over HTTP and parses the exposition. Label values
appear only once a service counts something, so the check is on metric names and types, and on the label names an
alert groups or matches by. The reconciliation is a batch job that pushes its metrics to a Pushgateway: its
registry is built from a real comparison and parsed the same way.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.unit.deploy.served_metrics import Served, label_names, metric_names
from tests.unit.deploy.test_alert_rules import OBSERVABILITY_DOC, RULES_FILE, alert_rules


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
