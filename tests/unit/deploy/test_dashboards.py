"""The Grafana dashboards: the checked-in JSON is what `deploy/grafana/dashboards.py` builds (nobody hand-edits it),
it decodes into grafana-foundation-sdk's models and back unchanged, and every metric a panel or variable queries is
served by a service with the labels the query uses (the same scrape as the alert check: `served_metrics.py`).

The chart renders them as a ConfigMap for the Grafana sidecar, with the datasources they name; the kind profile's
Grafana mounts that ConfigMap and Tempo remote-writes its span metrics to the kind Prometheus. No Grafana or Tempo
binary exists here: the dashboards are not rendered, only checked against the SDK's schema and the metrics, and
the manifests are rendered with `helm template` and validated offline.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from deploy.grafana import dashboards
from tests.unit.deploy.served_metrics import Served, label_names, metric_names
from tests.unit.deploy.test_kind_dependencies import containers, kind_dependencies, kind_platform, name_of
from tests.unit.deploy.test_manifests_valid import helm_template, validate_builtin

DATASOURCE_UIDS = {"prometheus", "tempo"}  # what the kind Grafana and the chart's datasource ConfigMap provision


def checked_in() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(dashboards.OUTPUT_DIR.glob("*.json"))}


def prometheus_queries() -> list[tuple[str, str, str]]:
    """(dashboard, where, PromQL) for every Prometheus target and query variable of every checked-in dashboard."""
    found = []
    for name, board in checked_in().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["uid"] == "prometheus":
                    found.append((name, panel["title"], target["expr"]))
        for variable in board.get("templating", {}).get("list", []):
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"])
                assert match, f"{name} ${variable['name']}: not a label_values(metric, label) query"
                metric, label = match.groups()
                found.append((name, f"${variable['name']}", f"count by ({label}) ({metric})"))
    return found


def test_the_checked_in_json_is_what_the_generator_builds():
    rendered = dashboards.render()
    on_disk = {path.name: path.read_text() for path in dashboards.OUTPUT_DIR.glob("*.json")}
    assert sorted(on_disk) == sorted(rendered), "a dashboard file without its builder, or the reverse"
    stale = sorted(name for name in rendered if on_disk[name] != rendered[name])
    assert stale == [], f"edit deploy/grafana/dashboards.py, then `python -m deploy.grafana.dashboards`: {stale}"


def test_the_check_mode_reports_a_hand_edited_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dashboards, "OUTPUT_DIR", tmp_path)
    assert dashboards.main([]) == 0  # writes every file
    assert dashboards.main(["--check"]) == 0
    edited = tmp_path / "data-quality.json"
    edited.write_text(edited.read_text().replace("Data quality", "Data qualiti"))
    assert dashboards.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_a_dashboard_decodes_into_the_sdk_models_and_back_unchanged(name: str):
    text = (dashboards.OUTPUT_DIR / name).read_text()
    model = Dashboard.from_json(json.loads(text))
    assert json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n" == text


def test_dashboards_have_unique_uids_known_datasources_and_fit_the_grid():
    boards = checked_in()
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids) == len(dashboards.DASHBOARDS)
    for name, board in boards.items():
        assert board["panels"], name
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            references = [panel.get("datasource")] + [target.get("datasource") for target in panel.get("targets", [])]
            for reference in filter(None, references):
                assert reference["uid"] in DATASOURCE_UIDS, (name, panel["title"], reference)
            if panel["type"] != "row":
                assert panel.get("targets"), f"{name}: panel {panel['title']!r} queries nothing"


def test_the_overview_covers_what_the_issue_asks_for():
    expressions = " ".join(expr for name, _, expr in prometheus_queries() if name == "pipeline-overview.json")
    for metric in (
        "lp_stage_records_in_total",  # rate per stage
        "lp_kafka_consumer_lag_seconds",  # lag
        "lp_sink_event_to_visible_seconds_bucket",  # end-to-end latency
        "lp_dead_letters_total",  # DLQ rate by reason
    ):
        assert metric in expressions
    tempo_panels = [
        p for p in checked_in()["pipeline-overview.json"]["panels"] if p.get("datasource", {}).get("uid") == "tempo"
    ]
    assert {panel["type"] for panel in tempo_panels} == {"nodeGraph", "table"}


@pytest.mark.parametrize(
    ("dashboard", "where", "expr"), prometheus_queries(), ids=lambda value: re.sub(r"\s+", " ", value)[:60]
)
def test_every_metric_a_dashboard_queries_is_served_with_the_labels_it_uses(
    dashboard: str, where: str, expr: str, service_metrics: Served, reconcile_pushed: Served
):
    names = metric_names(expr)
    assert names, expr
    served = service_metrics | reconcile_pushed
    missing = sorted(name for name in names if name not in served)
    assert not missing, f"{dashboard} {where!r} queries metrics no service serves: {missing}"
    known = set().union(*(served[name][1] for name in names)) | {"job", "instance"}
    if any(name.endswith("_bucket") for name in names):
        known.add("le")  # histogram_quantile groups buckets by their bound
    assert label_names(expr) <= known, f"{dashboard} {where!r}: labels none of its metrics has"


# --- the chart: dashboards and datasources as ConfigMaps for Grafana; the kind profile's Grafana and Tempo ---


def grafana_config_maps(*extra: str) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in helm_template(*extra)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(("-grafana-dashboards", "-grafana-datasources"))
    }


def test_the_chart_renders_the_checked_in_dashboards_for_the_grafana_sidecar():
    assert grafana_config_maps() == {}, "off by default"
    rendered = grafana_config_maps("--set", "metrics.grafana.dashboards.enabled=true")
    (config_map,) = rendered.values()
    validate_builtin(config_map)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Lambda pipeline"}
    assert set(config_map["data"]) == set(dashboards.DASHBOARDS)
    for name, text in config_map["data"].items():
        assert json.loads(text) == checked_in()[name], name


def test_the_chart_renders_datasources_with_the_uids_the_dashboards_use():
    rendered = grafana_config_maps(
        "--set", "metrics.grafana.datasources.enabled=true", "--set", "metrics.grafana.datasources.tempoUrl=http://t:1"
    )
    (config_map,) = rendered.values()
    validate_builtin(config_map)
    assert config_map["metadata"]["labels"]["grafana_datasource"] == "1"
    (provisioning,) = config_map["data"].values()
    sources = {source["uid"]: source for source in yaml.safe_load(provisioning)["datasources"]}
    assert set(sources) == DATASOURCE_UIDS
    assert {uid: source["type"] for uid, source in sources.items()} == {"prometheus": "prometheus", "tempo": "tempo"}
    assert sources["tempo"]["url"] == "http://t:1"


def test_the_kind_grafana_loads_the_platform_dashboards_and_has_the_same_datasource_uids():
    deps = {name_of(d): d for d in kind_dependencies()}
    platform = {name_of(d): d for d in kind_platform()}
    provisioned = yaml.safe_load(deps["ConfigMap/grafana-datasources"]["data"]["datasources.yaml"])
    assert {source["uid"] for source in provisioned["datasources"]} == DATASOURCE_UIDS
    assert not [name for name in platform if name.endswith("-grafana-datasources")], "kind provisions its own"
    pod = deps["Deployment/grafana"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dashboards"]
    assert f"ConfigMap/{volume['configMap']['name']}" in platform, "the kind Grafana mounts what the platform renders"
    assert volume["configMap"]["optional"] is True  # the platform release comes after this one
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "dashboards"]
    provider = yaml.safe_load(deps["ConfigMap/grafana-dashboard-provider"]["data"]["lambda-pipeline.yaml"])
    (source,) = provider["providers"]
    assert source["type"] == "file" and source["options"]["path"] == mount["mountPath"]


def test_the_kind_tempo_generates_service_graph_and_span_metrics_into_the_kind_prometheus():
    deps = {name_of(d): d for d in kind_dependencies()}
    tempo = yaml.safe_load(deps["ConfigMap/tempo"]["data"]["tempo.yaml"])
    assert tempo["overrides"]["defaults"]["metrics_generator"]["processors"] == ["service-graphs", "span-metrics"]
    assert tempo["metrics_generator"]["processor"]["service_graphs"]["enable_messaging_system_latency_histogram"]
    (remote_write,) = tempo["metrics_generator"]["storage"]["remote_write"]
    url = urlsplit(remote_write["url"])
    assert (url.hostname, url.port, url.path) == ("prometheus", 9090, "/api/v1/write")
    assert "Service/prometheus" in deps
    (prometheus,) = containers(deps["Deployment/prometheus"])
    assert "--web.enable-remote-write-receiver" in prometheus["args"]
