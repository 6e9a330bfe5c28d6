"""The Debezium Server part of the Helm chart: renders valid Kubernetes objects built from the shared properties."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from services.cdc.connector import parse_properties, server_properties_path

REPO_ROOT = Path(__file__).resolve().parents[3]


def manifest_checks() -> ModuleType:
    """The helpers of tests/unit/deploy/test_manifests_valid.py (helm binary, kubernetes-validate)."""
    path = REPO_ROOT / "tests/unit/deploy/test_manifests_valid.py"
    spec = importlib.util.spec_from_file_location("lp_manifest_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checks() -> ModuleType:
    return manifest_checks()


def debezium_objects(checks: ModuleType, *extra: str) -> dict[str, dict[str, Any]]:
    rendered = checks.helm_template("--set", "debezium.enabled=true", *extra)
    for document in rendered:
        checks.validate_any(document)
    return {
        d["kind"]: d
        for d in rendered
        if d["metadata"]["name"].endswith("-debezium") and d["kind"] in ("ConfigMap", "Deployment")
    }


def test_disabled_by_default(checks: ModuleType) -> None:
    assert not [d for d in checks.helm_template() if d["metadata"]["name"].endswith("-debezium")]


@pytest.mark.parametrize(
    "values", [[], ["-f", "deploy/helm/lambda-pipeline/values-kind.yaml"]], ids=["default", "kind"]
)
def test_enabled_renders_valid_objects(checks: ModuleType, values: list[str]) -> None:
    objects = debezium_objects(checks, *[str(REPO_ROOT / v) if v.endswith(".yaml") else v for v in values])
    assert set(objects) == {"ConfigMap", "Deployment"}
    checks.run(checks.tool("helm"), "lint", "--strict", checks.CHART_DIR, "--set", "debezium.enabled=true", *values)


def test_config_map_is_the_generated_application_properties(checks: ModuleType) -> None:
    config_map = debezium_objects(checks)["ConfigMap"]
    shipped = parse_properties(config_map["data"]["application.properties"])
    assert shipped == parse_properties(server_properties_path().read_text())


def test_deployment_runs_one_debezium_server_with_derived_connection(checks: ModuleType) -> None:
    deployment = debezium_objects(checks, "--set", "config.POSTGRES_DSN=postgresql://cdc@pg.db:6543/oltp")["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # one reader per slot
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("quay.io/debezium/server:3.")
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert env["PGHOST"] == "pg.db" and env["PGPORT"] == "6543"
    assert env["PGUSER"] == "cdc" and env["PGDATABASE"] == "oltp"
    assert "PGPASSWORD" not in env  # from Debezium's own Secret, that key only
    secret_env = [item for item in container["env"] if "valueFrom" in item]
    password = {"name": "lp-lambda-pipeline-debezium", "key": "PGPASSWORD", "optional": False}
    assert secret_env == [{"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": password}}]
    assert container["envFrom"] == [{"configMapRef": {"name": "lp-lambda-pipeline-config"}}]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/debezium/config"]["readOnly"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/q/health/live"
    (preflight,) = pod["initContainers"]
    assert preflight["args"] == ["services.cdc", "preflight"]
    assert preflight["image"] == "ghcr.io/lambda-pipeline/lambda-pipeline:0.1.0"


def test_default_port_and_extra_placeholders(checks: ModuleType) -> None:
    deployment = debezium_objects(
        checks,
        "--set",
        "config.POSTGRES_DSN=postgresql://u@pg/d",
        "--set",
        "debezium.env.CDC_SLOT_NAME=prod_cdc",
        "--set",
        "debezium.preflight=false",
    )["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"] if "value" in item}
    assert env["PGPORT"] == "5432" and env["CDC_SLOT_NAME"] == "prod_cdc"
    assert "initContainers" not in pod
