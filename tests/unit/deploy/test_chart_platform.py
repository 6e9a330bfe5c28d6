"""The chart's platform features, asserted on `helm template` output: NetworkPolicies, per-workload Secrets and key
files, lag-based autoscaling with KEDA capped at partition counts, ServiceMonitor toggles, and the loader's liveness.

Where the chart names environment variables or flows, they are checked against what the code reads (the services'
settings classes, Debezium's property placeholders) rather than against a copy of the chart.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from tests.unit.deploy.test_manifests_valid import CHART_DIR, K8S_DIR, REPO_ROOT, helm_template, tool, validate_any

PREFIX = "lp-lambda-pipeline-"
KIND_VALUES = ["-f", str(CHART_DIR / "values-kind.yaml")]
ALL_ON = ["--set", "debezium.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"]
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def helm_fails(*extra: str, chart: Path = CHART_DIR) -> str:
    """helm template must refuse these values: its error message."""
    done = subprocess.run(
        [str(tool("helm")), "template", "lp", str(chart), *extra], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0, "the render should have failed"
    return done.stderr


def by_kind(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """name (without the release prefix) -> object, for one kind."""
    return {d["metadata"]["name"].removeprefix(PREFIX): d for d in rendered if d["kind"] == kind}


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    return spec.get("jobTemplate", {}).get("spec", spec)["template"]["spec"]


def workloads(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every Deployment and CronJob: name -> object."""
    return {**by_kind(rendered, "Deployment"), **by_kind(rendered, "CronJob")}


def pod_labels(document: dict[str, Any]) -> dict[str, str]:
    spec = document["spec"]
    return spec.get("jobTemplate", {}).get("spec", spec)["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


# --- NetworkPolicies --------------------------------------------------------------------------------------------

# Each workload's flows besides DNS: what the code talks to (see FLOWS_FROM_SETTINGS for the cross-check).
EXPECTED_EGRESS = {
    "generator": ["kafka", "postgres", "tracing"],
    "ingest": ["kafka", "tracing"],
    "validator": ["kafka", "tracing"],
    "clickhouse-sink": ["kafka", "clickhouse", "tracing"],
    "archiver": ["kafka", "s3", "icebergCatalog", "tracing"],
    "snowflake-loader": ["s3", "icebergCatalog", "snowflake", "tracing"],
    "archiver-compact": ["s3", "icebergCatalog"],
    "archiver-expire": ["s3", "icebergCatalog"],
    "archiver-remove-orphans": ["s3", "icebergCatalog"],
    "reconcile": ["clickhouse", "s3", "icebergCatalog", "snowflake", "pushgateway"],
    "operator": ["kafka", "kubernetesApi"],
    "debezium": ["kafka", "postgres"],
}


def egress_of(flows: list[str], destinations: dict[str, Any]) -> list[dict[str, Any]]:
    rules = []
    for name in ["dns", *flows]:
        rule = {"to": destinations[name]["to"]}
        if destinations[name].get("ports"):
            rule["ports"] = destinations[name]["ports"]
        rules.append(rule)
    return rules


@pytest.mark.parametrize("values", [ALL_ON, [*KIND_VALUES, *ALL_ON]], ids=["default", "kind"])
def test_every_pod_is_denied_by_default_and_allowed_exactly_its_flows(values: list[str]) -> None:
    rendered = helm_template(*values)
    for document in rendered:
        validate_any(document)
    policies = by_kind(rendered, "NetworkPolicy")
    deny = policies.pop("lp-lambda-pipeline-default-deny".removeprefix(PREFIX))
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    kind_values = yaml.safe_load((CHART_DIR / "values-kind.yaml").read_text()) if values[:1] == ["-f"] else {}
    destinations = VALUES["networkPolicy"]["destinations"] | kind_values.get("networkPolicy", {}).get(
        "destinations", {}
    )
    metrics_from = kind_values.get("networkPolicy", {}).get("metricsFrom", VALUES["networkPolicy"]["metricsFrom"])
    pods = workloads(rendered)
    assert set(pods) == set(EXPECTED_EGRESS)
    for name, workload in pods.items():
        labels = pod_labels(workload)
        assert selects(deny["spec"]["podSelector"], labels), name
        (own,) = [p for p in policies.values() if selects(p["spec"]["podSelector"], labels)]
        assert own["metadata"]["name"] == PREFIX + name
        assert own["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert own["spec"]["egress"] == egress_of(EXPECTED_EGRESS[name], destinations), name
        ingress = own["spec"].get("ingress", [])
        containers = pod_spec(workload)["containers"]
        if workload["kind"] == "CronJob" or name == "debezium":
            assert ingress == [], f"{name} serves nothing"
            continue
        metrics_port = 8081 if name == "operator" else 8080
        assert {"from": metrics_from, "ports": [{"port": metrics_port, "protocol": "TCP"}]} in ingress
        api_ports = [p["containerPort"] for p in containers[0]["ports"] if p["name"] not in ("http", "metrics")]
        assert len(ingress) == 1 + len(api_ports), name
        for port in api_ports:  # the ingest API's gRPC: its clients, from anywhere unless `from` says otherwise
            assert {"ports": [{"port": port, "protocol": "TCP"}]} in ingress


# The flows a workload must have, from the settings classes the code builds: a class that can reach PostgreSQL,
# ClickHouse, the lake or Snowflake implies that flow.
FLOWS_FROM_SETTINGS = {
    "postgres_dsn": "postgres",
    "clickhouse_host": "clickhouse",
    "iceberg_rest_uri": "icebergCatalog",
    "snowflake_account": "snowflake",
}


def settings_classes() -> dict[str, list[type[BaseSettings]]]:
    """Workload -> the settings classes its process reads (services/*/settings, services/kit/config.py)."""
    from services.archiver.settings import ArchiverCommandSettings, ArchiverSettings
    from services.cdc.settings import CdcSettings
    from services.clickhouse_sink.settings import ClickHouseSinkSettings
    from services.generator.app import GeneratorSettings
    from services.ingest.app import IngestSettings
    from services.kit.health import HealthSettings
    from services.operator.settings import OperatorConfig
    from services.reconcile.settings import ReconcileSettings
    from services.snowflake_loader.settings import LoaderSettings
    from services.stores.clickhouse import ClickHouseSettings
    from services.stores.iceberg import CatalogSettings
    from services.stores.snowflake import SnowflakeSettings
    from services.validator.processor import ValidatorSettings

    lake_commands = [ArchiverCommandSettings]
    return {
        "generator": [GeneratorSettings, HealthSettings],
        "ingest": [IngestSettings, HealthSettings],
        "validator": [ValidatorSettings, HealthSettings],
        "clickhouse-sink": [ClickHouseSinkSettings, HealthSettings],
        "archiver": [ArchiverSettings, HealthSettings],
        "snowflake-loader": [LoaderSettings, HealthSettings],
        "archiver-compact": lake_commands,
        "archiver-expire": lake_commands,
        "archiver-remove-orphans": lake_commands,
        "reconcile": [ReconcileSettings, ClickHouseSettings, CatalogSettings, SnowflakeSettings],
        "operator": [OperatorConfig],
        "debezium": [CdcSettings],  # its preflight init container
    }


def variables(classes: list[type[BaseSettings]]) -> set[str]:
    names = set()
    for cls in classes:
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        names |= {prefix + field.upper() for field in cls.model_fields}
    return names


def test_flows_follow_what_the_code_connects_to() -> None:
    from services.kit.config import ServiceSettings

    for name, classes in settings_classes().items():
        fields = {field for cls in classes for field in cls.model_fields}
        implied = {flow for field, flow in FLOWS_FROM_SETTINGS.items() if field in fields}
        if "iceberg_rest_uri" in fields:
            implied.add("s3")
        flows = set(EXPECTED_EGRESS[name])
        stores = {*FLOWS_FROM_SETTINGS.values(), "s3"}
        assert flows & stores == implied, f"{name}: flows {sorted(flows & stores)}, settings for {sorted(implied)}"
        kafka_required = any(
            issubclass(cls, ServiceSettings) and cls.model_fields["kafka_bootstrap_servers"].is_required()
            for cls in classes
        )
        if kafka_required:
            assert "kafka" in flows, name


def test_network_policies_follow_values_and_refuse_unknown_flows(tmp_path: Path) -> None:
    values = tmp_path / "np.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {
                    "destinations": {"kafka": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": []}},
                    "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "sre"}}}],
                },
                "services": {
                    "ingest": {"extraPorts": [{"name": "grpc", "port": 50051, "from": [{"podSelector": {}}]}]}
                },
            }
        )
    )
    policies = by_kind(helm_template("-f", str(values)), "NetworkPolicy")
    validator_egress = policies["validator"]["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]} in validator_egress  # no ports: every port of Kafka
    ingest_ingress = policies["ingest"]["spec"]["ingress"]
    assert {"ports": [{"port": 50051, "protocol": "TCP"}], "from": [{"podSelector": {}}]} in ingest_ingress
    assert ingest_ingress[0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "sre"}}}]
    assert not by_kind(helm_template("--set", "networkPolicy.enabled=false"), "NetworkPolicy")
    error = helm_fails("--set", "services.validator.connectsTo={kafka,redis}")
    assert 'services.validator.connectsTo: no "redis" in networkPolicy.destinations' in error
    # a destination without peers would allow everything: the schema refuses it
    assert "kafka.to: Array must have at least 1 items" in helm_fails(
        "--set-json", 'networkPolicy.destinations.kafka={"to": []}'
    )


# --- Secrets ----------------------------------------------------------------------------------------------------

EXPECTED_SECRET_ENV = {
    "generator": {"PGPASSWORD"},
    "ingest": set(),
    "validator": set(),
    "clickhouse-sink": {"CLICKHOUSE_PASSWORD"},
    "archiver": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "snowflake-loader": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "archiver-compact": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "archiver-expire": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "archiver-remove-orphans": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "reconcile": {"CLICKHOUSE_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICEBERG_REST_CREDENTIAL"},
    "operator": set(),
    "debezium": {"PGPASSWORD"},
}
# Whose Secret a workload reads: its own, or its service's (jobs without a Secret of their own).
SECRET_OWNER = {"archiver-compact": "archiver", "archiver-expire": "archiver", "archiver-remove-orphans": "archiver"}


def test_each_workload_reads_only_its_keys_from_its_own_secret() -> None:
    rendered = helm_template(*ALL_ON)
    for name, workload in workloads(rendered).items():
        pod = pod_spec(workload)
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert all("secretRef" not in source for source in container.get("envFrom", [])), name  # no envFrom
            refs = secret_refs(container)
            assert set(refs) == EXPECTED_SECRET_ENV[name], name
            assert {ref["name"] for ref in refs.values()} <= {PREFIX + SECRET_OWNER.get(name, name)}
            assert all(ref["key"] == variable for variable, ref in refs.items())
    loader = pod_spec(workloads(rendered)["snowflake-loader"])["containers"][0]
    assert secret_refs(loader)["AWS_ACCESS_KEY_ID"]["optional"] is True  # workload identity leaves it unset
    generator = pod_spec(workloads(rendered)["generator"])["containers"][0]
    assert secret_refs(generator)["PGPASSWORD"]["optional"] is False


def debezium_placeholders() -> set[str]:
    properties = (REPO_ROOT / "deploy/debezium/application.properties").read_text()
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", properties))


# Read by something other than a settings class: the OTel SDK, libpq, the pod's own fields; SERVICE_NAME is set on
# every pod (a ServiceSettings field; the reconciliation, not a Service, ignores it).
NOT_SETTINGS = {"OTEL_RESOURCE_ATTRIBUTES", "POD_NAME", "POD_NAMESPACE", "PGPASSWORD", "SERVICE_NAME"}


@pytest.mark.parametrize("values", [ALL_ON, [*KIND_VALUES, *ALL_ON]], ids=["default", "kind"])
def test_every_variable_the_chart_sets_is_one_the_code_reads(values: list[str]) -> None:
    """Names from env, Secrets and key files against the settings classes (a misspelt name is silently unused)."""
    rendered = helm_template(*values)
    classes = settings_classes()
    config = by_kind(rendered, "ConfigMap")["config"]["data"]
    for name, workload in workloads(rendered).items():
        pod = pod_spec(workload)
        known = variables(classes[name]) | NOT_SETTINGS
        if name in SECRET_OWNER:  # a job with `service` carries that service's env (ignored, extra="ignore")
            service = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["services"][SECRET_OWNER[name]]
            known |= set(service["env"])
        if name == "reconcile":
            known |= set(VALUES["services"]["archiver"]["env"])
        containers = pod["containers"]
        if name == "debezium":  # the init container runs services.cdc; Debezium reads its properties' placeholders
            (preflight,) = pod["initContainers"]
            # services.cdc reads the property set's placeholders from its environment too (connector_variables)
            unknown = {item["name"] for item in preflight["env"]} - known - debezium_placeholders()
            assert not unknown, f"debezium preflight: {unknown}"
            server_known = debezium_placeholders() | {"JAVA_OPTS", "QUARKUS_CONFIG_LOCATIONS"}
            unknown = {item["name"] for item in containers[0]["env"]} - server_known
            assert not unknown, f"debezium: {unknown} are not placeholders of application.properties"
            continue
        for container in containers:
            unknown = {item["name"] for item in container["env"]} - known
            assert not unknown, f"{name}: {unknown} are read by none of {[c.__name__ for c in classes[name]]}"
    for key in config:  # the shared ConfigMap: read by at least one workload
        assert any(key in variables(c) for c in classes.values()), key


def test_existing_secrets_and_sasl_credentials(tmp_path: Path) -> None:
    values = tmp_path / "secrets.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "config": {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
                "services": {
                    "generator": {"secret": {"existingSecret": "oltp-credentials"}},
                    "archiver": {"secret": {"existingSecret": "lake-credentials"}},
                    "validator": {"lagAutoscaling": {"authenticationRef": "kafka-sasl"}},
                },
                "debezium": {"enabled": True},
            }
        )
    )
    rendered = helm_template("-f", str(values))
    pods = workloads(rendered)
    generator = secret_refs(pod_spec(pods["generator"])["containers"][0])
    assert {ref["name"] for ref in generator.values()} == {"oltp-credentials"}
    for job in ("archiver-compact", "archiver-expire", "archiver-remove-orphans"):  # the jobs follow their service
        assert {ref["name"] for ref in secret_refs(pod_spec(pods[job])["containers"][0]).values()} == {
            "lake-credentials"
        }
    sasl = {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
    for name, workload in pods.items():
        refs = secret_refs(pod_spec(workload)["containers"][0])
        kafka_client = "kafka" in EXPECTED_EGRESS[name] and name != "debezium"  # Debezium takes no SASL settings
        assert (sasl <= set(refs)) is kafka_client, name
        assert not (sasl & set(refs)) or all(refs[v]["optional"] is False for v in sasl)
    (scaled,) = by_kind(rendered, "ScaledObject").values()
    assert all(trigger["authenticationRef"] == {"name": "kafka-sasl"} for trigger in scaled["spec"]["triggers"])
    error = helm_fails("--set", "config.KAFKA_SECURITY_PROTOCOL=SASL_SSL")
    assert "services.validator.lagAutoscaling.authenticationRef" in error


def test_key_files_are_mounted_read_only_where_their_variable_points(tmp_path: Path) -> None:
    values = tmp_path / "keypair.yaml"
    key_pair = [
        {"key": "snowflake_key.p8", "env": "SNOWFLAKE_PRIVATE_KEY_FILE"},
        {"key": "snowflake_key_passphrase", "env": "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE"},
    ]
    values.write_text(yaml.safe_dump({"services": {"snowflake-loader": {"secret": {"files": key_pair}}}}))
    for extra, files in (
        (["--set", "image.tag=x"], [("SNOWFLAKE_PASSWORD", "SNOWFLAKE_PASSWORD_FILE")]),
        (
            ["-f", str(values)],
            [(f["key"], f["env"]) for f in key_pair],
        ),
    ):
        rendered = helm_template(*extra)
        loader = workloads(rendered)["snowflake-loader"]
        pod = pod_spec(loader)
        validate_any(loader)
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secret-files"]
        assert mount["readOnly"] is True and mount["mountPath"] == "/var/run/secrets/lambda-pipeline"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "secret-files"]
        assert volume["secret"]["secretName"] == PREFIX + "snowflake-loader"
        assert volume["secret"]["defaultMode"] == 0o440  # the pod's fsGroup reads, nobody writes
        assert volume["secret"]["items"] == [{"key": key, "path": key} for key, _ in files]
        env = env_values(container)
        for key, variable in files:
            assert env[variable] == f"/var/run/secrets/lambda-pipeline/{key}"
        assert "SNOWFLAKE_PASSWORD" not in env and "SNOWFLAKE_PASSWORD" not in secret_refs(container)
    # the reconciliation mounts its own Snowflake password the same way
    reconcile = pod_spec(workloads(helm_template())["reconcile"])["containers"][0]
    assert env_values(reconcile)["SNOWFLAKE_PASSWORD_FILE"] == "/var/run/secrets/lambda-pipeline/SNOWFLAKE_PASSWORD"
    # a pod without key files has no such volume
    assert all(v["name"] != "secret-files" for v in pod_spec(workloads(helm_template())["generator"])["volumes"])


def test_the_loaders_settings_accept_the_mounted_files(tmp_path: Path) -> None:
    """The variables the chart sets, with files at the paths it mounts, are a valid SnowflakeSettings."""
    from services.stores.snowflake import SnowflakeSettings

    container = pod_spec(workloads(helm_template())["snowflake-loader"])["containers"][0]
    env = env_values(container)
    mounted = tmp_path / "SNOWFLAKE_PASSWORD"
    mounted.write_text("secret\n")
    fields = {k.lower(): v for k, v in env.items() if k.lower() in SnowflakeSettings.model_fields}
    fields["snowflake_password_file"] = str(mounted)  # the mount, here
    settings = SnowflakeSettings(**fields)
    assert settings.snowflake_password_file == mounted and settings.snowflake_password is None


def test_dev_secrets_give_each_workload_only_its_keys() -> None:
    """devSecrets is one map of dev credentials; each workload's Secret gets exactly the keys it reads."""
    rendered = helm_template(*KIND_VALUES, *ALL_ON)
    secrets = by_kind(rendered, "Secret")
    dev = yaml.safe_load((CHART_DIR / "values-kind.yaml").read_text())["devSecrets"]
    for name, workload in workloads(rendered).items():
        pod = pod_spec(workload)
        wanted = set()
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            wanted |= {ref["key"] for ref in secret_refs(container).values() if ref["key"] in dev}
        wanted |= {
            item["key"]
            for volume in pod["volumes"]
            if volume["name"] == "secret-files"
            for item in volume["secret"]["items"]
        }
        owner = SECRET_OWNER.get(name, name)
        if not wanted:
            assert owner not in secrets, name
            continue
        assert secrets[owner]["stringData"] == {key: dev[key] for key in wanted}, name
    assert not by_kind(helm_template(), "Secret")  # production: none from the chart
    assert "devSecrets has no PGPASSWORD, which services.generator requires" in helm_fails("--set", "devSecrets.X=1")
    sasl = helm_template(
        *KIND_VALUES,
        "--set",
        "config.KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        "--set",
        "devSecrets.KAFKA_SASL_USERNAME=u",
        "--set",
        "devSecrets.KAFKA_SASL_PASSWORD=p",
        "--set",
        "services.validator.lagAutoscaling.authenticationRef=kafka",
    )
    assert by_kind(sasl, "Secret")["validator"]["stringData"] == {
        "KAFKA_SASL_USERNAME": "u",
        "KAFKA_SASL_PASSWORD": "p",
    }


# --- autoscaling ------------------------------------------------------------------------------------------------


def declared_partitions() -> dict[str, int]:
    found = {}
    for path in (K8S_DIR / "topics").glob("*.yaml"):
        topic = yaml.safe_load(path.read_text())
        found[topic["spec"]["topicName"]] = topic["spec"]["partitions"]
    return found


@pytest.mark.parametrize("values", [[], KIND_VALUES], ids=["default", "kind"])
def test_consumers_scale_on_lag_and_the_ingest_api_on_cpu(values: list[str]) -> None:
    from services.validator.processor import ValidatorSettings

    rendered = helm_template(*values)
    scaled = by_kind(rendered, "ScaledObject")
    hpas = by_kind(rendered, "HorizontalPodAutoscaler")
    assert set(scaled) == {"validator"} and set(hpas) == {"ingest"}
    assert not set(scaled) & set(hpas)  # never both on one workload
    assert hpas["ingest"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    validator = scaled["validator"]
    validate_any(validator)
    deployment = by_kind(rendered, "Deployment")["validator"]
    assert validator["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it
    container = pod_spec(deployment)["containers"][0]
    group = env_values(container)["CONSUMER_GROUP"]
    assert group == ValidatorSettings.model_fields["consumer_group"].default
    config = by_kind(rendered, "ConfigMap")["config"]["data"]
    triggers = validator["spec"]["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == ["events.raw", "events.raw.retry"]
    partitions = declared_partitions()
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        metadata = trigger["metadata"]
        assert metadata["consumerGroup"] == group
        assert metadata["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
        assert metadata["allowIdleConsumers"] == "false"
        assert validator["spec"]["maxReplicaCount"] <= partitions[metadata["topic"]]
    assert validator["spec"]["maxReplicaCount"] == 16


def test_a_sink_can_scale_on_lag_with_its_own_group() -> None:
    from services.archiver.settings import ArchiverSettings

    rendered = helm_template(
        "--set",
        "services.archiver.lagAutoscaling.enabled=true",
        "--set",
        "services.archiver.lagAutoscaling.maxReplicas=4",
        "--set",
        "services.archiver.lagAutoscaling.topics={events.processed,transactions.processed}",
    )
    archiver = by_kind(rendered, "ScaledObject")["archiver"]
    validate_any(archiver)
    group = ArchiverSettings.model_fields["consumer_group"].default
    assert {t["metadata"]["consumerGroup"] for t in archiver["spec"]["triggers"]} == {group}
    assert "archiver" in by_kind(rendered, "PodDisruptionBudget")  # scaled, so a drain takes one pod at a time
    assert "replicas" not in by_kind(rendered, "Deployment")["archiver"]["spec"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["--set", "services.validator.autoscaling.enabled=true"],
            "services.validator: autoscaling (CPU HPA) and lagAutoscaling (KEDA) are both enabled",
        ),
        (
            ["--set", "services.validator.lagAutoscaling.maxReplicas=17"],
            "services.validator.lagAutoscaling.maxReplicas 17 exceeds the 16 partitions of events.raw",
        ),
        (
            ["--set", "services.validator.lagAutoscaling.topics={events.raw,events.raw.dlq}"],
            "exceeds the 4 partitions of events.raw.dlq",
        ),
        (
            ["--set", "services.validator.lagAutoscaling.topics={events.cooked}"],
            '"events.cooked" is not declared in deploy/k8s/topics',
        ),
        (
            [
                "--set",
                "services.ingest.lagAutoscaling.enabled=true",
                "--set",
                "services.ingest.autoscaling.enabled=false",
            ],
            "services.ingest.lagAutoscaling.topics is empty",
        ),
        (
            [
                "--set",
                "services.generator.lagAutoscaling.enabled=true",
                "--set",
                "services.generator.lagAutoscaling.topics={events.raw}",
            ],
            "services.generator.lagAutoscaling.consumerGroup is empty",
        ),
    ],
)
def test_autoscaling_refuses_what_cannot_work(settings: list[str], message: str) -> None:
    assert message in helm_fails(*settings)


def test_the_partition_cap_is_read_from_the_topic_declarations(tmp_path: Path) -> None:
    """Fewer partitions declared for events.raw, and the same values fail: the cap is not a copy in the chart."""
    chart = tmp_path / "lambda-pipeline"
    shutil.copytree(CHART_DIR, chart, symlinks=False)
    topic = chart / "files/topics/events-raw.yaml"
    topic.write_text(topic.read_text().replace("partitions: 16", "partitions: 8"))
    assert "exceeds the 8 partitions of events.raw" in helm_fails(chart=chart)


# --- ServiceMonitor ---------------------------------------------------------------------------------------------


def test_service_monitors_are_a_toggle() -> None:
    assert not [d for d in helm_template() if d["apiVersion"].startswith("monitoring.coreos.com/")]
    rendered = helm_template(
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom"
    )
    (monitor,) = by_kind(rendered, "ServiceMonitor").values()
    (pod_monitor,) = by_kind(rendered, "PodMonitor").values()
    for document in (monitor, pod_monitor):
        validate_any(document)
        assert document["metadata"]["labels"]["release"] == "prom"
        assert document["spec"]["namespaceSelector"] == {"matchNames": ["data"]}
    services = by_kind(rendered, "Service")
    assert len(services) == 6
    for service in services.values():  # every Service is scraped, on its http port
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert "http" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    operator = by_kind(rendered, "Deployment")["operator"]
    assert selects(pod_monitor["spec"]["selector"], pod_labels(operator))
    assert "metrics" in {p["name"] for p in pod_spec(operator)["containers"][0]["ports"]}


# --- the loader's liveness ----------------------------------------------------------------------------------------


def test_the_loaders_liveness_outlasts_a_long_load() -> None:
    """/healthz fails once the loop has not turned for HEALTH_PROGRESS_BUDGET_S, and the loop turns once per table:
    the budget must cover a table's load (the SIGTERM budget assumes up to SHUTDOWN_TIMEOUT_S) and the connector's
    own timeout for a hung statement, after which the load fails and the loop turns anyway."""
    from services.kit.health import HealthSettings
    from services.stores.snowflake import SnowflakeSettings

    deployment = by_kind(helm_template(), "Deployment")["snowflake-loader"]
    (container,) = pod_spec(deployment)["containers"]
    env = env_values(container)
    budget = HealthSettings(progress_budget_s=env["HEALTH_PROGRESS_BUDGET_S"]).progress_budget_s
    network_timeout = float(
        env.get("SNOWFLAKE_NETWORK_TIMEOUT_S", SnowflakeSettings.model_fields["snowflake_network_timeout_s"].default)
    )
    assert budget > network_timeout
    assert budget >= float(env["SHUTDOWN_TIMEOUT_S"])
    probe = container["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert budget + probe["periodSeconds"] * probe["failureThreshold"] >= 900
    # the other services keep the code's default budget: a stuck consumer is restarted within minutes
    validator = pod_spec(by_kind(helm_template(), "Deployment")["validator"])["containers"][0]
    assert "HEALTH_PROGRESS_BUDGET_S" not in env_values(validator)


# --- values.schema.json for the new keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("networkPolicy.enabeld=false", "enabeld"),
        ("networkPolicy.destinations.kafka.ports[0].protocl=TCP", "protocl"),
        ("services.validator.lagAutoscaling.maxReplica=3", "maxReplica"),
        ("services.generator.secret.existingSecrets=x", "existingSecrets"),
        ("services.generator.secret.files[0].path=x", "path"),
        ("jobs.reconcile.secret.mountpath=/x", "mountpath"),
        ("metrics.serviceMonitor.enable=true", "enable"),
        ("metrics.grafana.dashboards.enable=true", "Additional property enable"),
        ("metrics.grafana.datasources.tempoURL=x", "tempoURL"),
        ("operator.peerin=x", "peerin"),
        ("debezium.javaopts=x", "javaopts"),
        ("image.digest=latest", "digest"),
    ],
)
def test_values_schema_refuses_typos_in_the_new_keys(setting: str, named: str) -> None:
    assert named in helm_fails("--set", setting)
