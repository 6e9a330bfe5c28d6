"""The kopf operator, running (``python -m services.operator``), against kmock's Kubernetes API emulator for the
API side and a real local broker (Tansu) for Kafka: the "Must show" list of issue 14.

One broker, one emulator and one operator for the module (about a minute); each test uses its own topic names.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from services.contracts.schema_store import StoreWriterResolver
from services.kit.avro import AvroDeserializer, AvroSerializer, DecodeError, Schema, SchemaRepository
from services.operator.handlers import API_ACCESS
from services.stack import LocalStack, StackSettings
from services.testing.kube import KubeEmulator
from services.testing.net import free_port, http_status, metric_totals
from services.testing.processes import kill, log_tails, run_module, start_module, stop, wait_for

pytestmark = pytest.mark.integration

API = "lambdapipeline.io/v1alpha1"
NAMESPACE = "data"
PEERING = "lambda-pipeline"
DRIFT_INTERVAL_S = 2.0
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    state_dir = Path(tempfile.mkdtemp(prefix="lp-operator-"))
    try:
        with LocalStack(StackSettings.with_free_ports(state_dir=state_dir), only=["broker"]) as broker_only:
            yield broker_only.bootstrap_servers
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeEmulator]:
    resources = {
        f"{API}/kafkatopics": ("KafkaTopic", True, ["status"]),
        f"{API}/eventschemas": ("EventSchema", True, ["status"]),
        "v1/events": ("Event", True, []),
        "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, []),
        # Only discovered, never requested: kopf waits for these to be discoverable, as they always are.
        "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
        "v1/namespaces": ("Namespace", False, []),
    }
    with KubeEmulator(resources) as emulator:
        emulator.create("kopf.dev/v1", "kopfpeerings", NAMESPACE, {"metadata": {"name": PEERING}})
        yield emulator


@pytest.fixture(scope="module")
def operator(kube: KubeEmulator, bootstrap: str) -> Iterator[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="lp-operator-run-"))
    log = work / "operator.log"
    ports = {"liveness": free_port(), "metrics": free_port()}
    env = {
        "KUBECONFIG": str(kube.kubeconfig(work / "kubeconfig")),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "OPERATOR_NAMESPACES": NAMESPACE,
        "OPERATOR_PEERING": PEERING,
        "OPERATOR_DRIFT_INTERVAL_S": str(DRIFT_INTERVAL_S),
        "OPERATOR_KAFKA_TIMEOUT_S": "10",
        "OPERATOR_RETRY_BACKOFF_S": "1",
        "OPERATOR_RETRY_BACKOFF_MAX_S": "2",
        "OPERATOR_CAP_REPLICATION_FACTOR": "true",
        "HTTP_PORT": str(ports["liveness"]),
        "OPERATOR_METRICS_PORT": str(ports["metrics"]),
        "LOG_FORMAT": "text",
    }
    process = start_module("services.operator", env=env, log_path=log)
    try:
        wait_for(lambda: http_status(ports["liveness"], "/healthz") == 200, 60, "kopf liveness", log, process=process)
        yield {"process": process, "log": log, **ports}
        assert stop(process, timeout=30) == 0, log_tails(log)
    finally:
        kill(process)
        shutil.rmtree(work, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------------------


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def partitions(bootstrap: str, topic: str) -> int | None:
    found = admin(bootstrap).list_topics(timeout=10).topics.get(topic)
    return None if found is None else len(found.partitions)


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    client = admin(bootstrap)  # kept until the future is done: a collected client cancels its requests
    (future,) = client.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=10).items()}


def topic_resource(name: str, topic: str, partitions: int = 3, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "KafkaTopic",
        "metadata": {"name": name},
        "spec": {"topicName": topic, "partitions": partitions, "replicationFactor": 1, **spec},
    }


def schema_resource(name: str, subject: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "EventSchema",
        "metadata": {"name": name},
        "spec": {
            "subject": subject,
            "compatibility": "BACKWARD",
            "schema": {"type": "record", "name": "Order", "namespace": "lp.test", "fields": fields},
        },
    }


def ready(kube: KubeEmulator, plural: str, name: str) -> dict[str, Any] | None:
    found = kube.get(API, plural, NAMESPACE, name)
    conditions = ((found or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), None)


def wait_reason(
    kube: KubeEmulator, operator: dict[str, Any], plural: str, name: str, reason: str, contains: str = ""
) -> dict[str, Any]:
    def reached() -> bool:
        condition = ready(kube, plural, name)
        return bool(condition) and condition["reason"] == reason and contains in condition.get("message", "")

    wait_for(
        reached,
        TIMEOUT_S,
        f"{plural}/{name} Ready reason {reason} ({ready(kube, plural, name)})",
        operator["log"],
        process=operator["process"],
    )
    return kube.get(API, plural, NAMESPACE, name)


def events_for(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "events", NAMESPACE) if (e.get("involvedObject") or {}).get("name") == name]


def wait_until(condition: Callable[[], bool], what: str, operator: dict[str, Any]) -> None:
    wait_for(condition, TIMEOUT_S, what, operator["log"], process=operator["process"])


# --- topics -----------------------------------------------------------------------------------------------


def test_create_then_the_topic_exists_with_its_partitions_and_configs(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    config = {"retention.ms": "3600000", "cleanup.policy": "delete"}
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("orders", "op.orders", 3, config=config))
    resource = wait_reason(kube, operator, "kafkatopics", "orders", "Created")
    assert partitions(bootstrap, "op.orders") == 3
    assert topic_config(bootstrap, "op.orders")["retention.ms"] == "3600000"
    status = resource["status"]
    assert status["observedGeneration"] == 1 and status["partitions"] == 3
    assert status["appliedConfigs"] == config
    assert status["conditions"][0]["status"] == "True"
    wait_until(lambda: any(e["reason"] == "Created" for e in events_for(kube, "orders")), "a Created event", operator)


def test_raise_partitions_reaches_the_broker(kube: KubeEmulator, operator: dict[str, Any], bootstrap: str) -> None:
    """Tansu (the local broker) has no CreatePartitions: the raise is asked for and its refusal is reported as a
    KafkaError, retried; on a real Kafka the same call raises them (reason Updated)."""
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("grow", "op.grow", 2))
    wait_reason(kube, operator, "kafkatopics", "grow", "Created")
    kube.patch_spec(API, "kafkatopics", NAMESPACE, "grow", {"partitions": 4})
    resource = wait_reason(
        kube, operator, "kafkatopics", "grow", "KafkaError", "cannot increase partitions from 2 to 4"
    )
    assert resource["status"]["conditions"][0]["status"] == "False"
    assert resource["status"]["observedGeneration"] == 2
    assert "does not support CreatePartitions" in resource["status"]["conditions"][0]["message"]
    kube.patch_spec(API, "kafkatopics", NAMESPACE, "grow", {"partitions": 2})  # back, so retries stop


def test_lower_partitions_is_not_supported_and_changes_nothing(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("shrink", "op.shrink", 4))
    wait_reason(kube, operator, "kafkatopics", "shrink", "Created")
    kube.patch_spec(API, "kafkatopics", NAMESPACE, "shrink", {"partitions": 2})
    resource = wait_reason(kube, operator, "kafkatopics", "shrink", "NotSupported", "cannot decrease partitions")
    assert partitions(bootstrap, "op.shrink") == 4
    assert resource["status"]["partitions"] == 4 and resource["status"]["observedGeneration"] == 2
    wait_until(
        lambda: any(e["reason"] == "NotSupported" and e["type"] == "Warning" for e in events_for(kube, "shrink")),
        "a NotSupported warning event",
        operator,
    )


def test_config_drift_is_reverted_by_the_timer_and_foreign_keys_stay(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("drift", "op.drift", 1, config={"retention.ms": "60000"}))
    wait_reason(kube, operator, "kafkatopics", "drift", "Created")
    changes = [
        ConfigEntry("retention.ms", "999", incremental_operation=AlterConfigOpType.SET),  # owned by the spec
        ConfigEntry("max.message.bytes", "123456", incremental_operation=AlterConfigOpType.SET),  # another tool's
    ]
    client = admin(bootstrap)
    (future,) = client.incremental_alter_configs(
        [ConfigResource(ResourceType.TOPIC, "op.drift", incremental_configs=changes)]
    ).values()
    future.result(timeout=10)
    wait_until(lambda: topic_config(bootstrap, "op.drift")["retention.ms"] == "60000", "drift reverted", operator)
    resource = wait_reason(kube, operator, "kafkatopics", "drift", "Updated", "drift reverted")
    assert "retention.ms: 999 -> 60000" in resource["status"]["conditions"][0]["message"]
    time.sleep(DRIFT_INTERVAL_S * 2)
    assert topic_config(bootstrap, "op.drift")["max.message.bytes"] == "123456"  # not the spec's: left alone
    assert metric_totals(operator["metrics"]).get("lp_operator_drift_reverted_total", 0) >= 1


def test_delete_with_retain_keeps_the_topic(kube: KubeEmulator, operator: dict[str, Any], bootstrap: str) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("kept", "op.kept", 1))
    wait_reason(kube, operator, "kafkatopics", "kept", "Created")
    kube.delete(API, "kafkatopics", NAMESPACE, "kept")
    wait_until(lambda: kube.get(API, "kafkatopics", NAMESPACE, "kept") is None, "the resource gone", operator)
    time.sleep(DRIFT_INTERVAL_S * 2)
    assert partitions(bootstrap, "op.kept") == 1


def test_delete_with_delete_removes_the_topic_for_good(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("gone", "op.gone", 1, deletionPolicy="Delete"))
    resource = wait_reason(kube, operator, "kafkatopics", "gone", "Created")
    wait_until(
        lambda: (
            "lambdapipeline.io/deletion-policy"
            in (kube.get(API, "kafkatopics", NAMESPACE, "gone")["metadata"].get("finalizers") or [])
        ),
        "the finalizer of the Delete policy",
        operator,
    )
    assert resource["status"]["partitions"] == 1
    kube.delete(API, "kafkatopics", NAMESPACE, "gone")
    wait_until(lambda: kube.get(API, "kafkatopics", NAMESPACE, "gone") is None, "the finalizer released", operator)
    wait_until(lambda: partitions(bootstrap, "op.gone") is None, "the topic deleted", operator)
    time.sleep(DRIFT_INTERVAL_S * 3)  # several timer rounds, and the retries of every handler
    assert partitions(bootstrap, "op.gone") is None
    assert any(e["reason"] == "Deleted" for e in events_for(kube, "gone"))


def test_two_resources_for_one_topic_the_oldest_wins(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("first", "op.shared", 2))
    wait_reason(kube, operator, "kafkatopics", "first", "Created")
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("second", "op.shared", 5, deletionPolicy="Delete"))
    resource = wait_reason(kube, operator, "kafkatopics", "second", "ResourceConflict", f"{NAMESPACE}/first")
    assert resource["status"]["conditions"][0]["status"] == "False"
    assert metric_totals(operator["metrics"]).get("lp_operator_reconcile_errors_total", 0) >= 1  # not Ready: an error
    assert partitions(bootstrap, "op.shared") == 2
    # The loser's Delete policy never deletes the winner's topic.
    kube.delete(API, "kafkatopics", NAMESPACE, "second")
    wait_until(lambda: kube.get(API, "kafkatopics", NAMESPACE, "second") is None, "the loser gone", operator)
    assert partitions(bootstrap, "op.shared") == 2


def test_a_pre_existing_topic_is_adopted(kube: KubeEmulator, operator: dict[str, Any], bootstrap: str) -> None:
    client = admin(bootstrap)
    (future,) = client.create_topics([NewTopic("op.legacy", num_partitions=2, replication_factor=1)]).values()
    future.result(timeout=10)
    spec_config = {"retention.ms": "7200000"}
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("legacy", "op.legacy", 2, config=spec_config))
    resource = wait_reason(kube, operator, "kafkatopics", "legacy", "Adopted")
    assert resource["status"]["partitions"] == 2
    assert topic_config(bootstrap, "op.legacy")["retention.ms"] == "7200000"


def test_unmanaged_and_paused_resources_are_left_alone(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    unmanaged = topic_resource("hands-off", "op.hands-off", 1)
    unmanaged["metadata"]["annotations"] = {"lambdapipeline.io/unmanaged": "true"}
    kube.create(API, "kafkatopics", NAMESPACE, unmanaged)
    paused = topic_resource("paused", "op.paused", 1)
    paused["metadata"]["annotations"] = {"lambdapipeline.io/paused": "true"}
    kube.create(API, "kafkatopics", NAMESPACE, paused)
    wait_reason(kube, operator, "kafkatopics", "paused", "Paused", "not created")
    assert ready(kube, "kafkatopics", "hands-off") is None
    assert partitions(bootstrap, "op.hands-off") is None and partitions(bootstrap, "op.paused") is None
    kube.patch(
        API, "kafkatopics", NAMESPACE, "paused", {"metadata": {"annotations": {"lambdapipeline.io/paused": None}}}
    )
    wait_reason(kube, operator, "kafkatopics", "paused", "Created")
    assert partitions(bootstrap, "op.paused") == 1


# --- schemas ----------------------------------------------------------------------------------------------

V1_FIELDS = [{"name": "id", "type": "string"}, {"name": "amount", "type": "long"}]
V2_FIELDS = [*V1_FIELDS, {"name": "currency", "type": "string", "default": "EUR"}]
BROKEN_FIELDS = [{"name": "id", "type": "string"}, {"name": "amount", "type": "string"}]


def test_an_incompatible_schema_is_refused_and_a_compatible_one_registered(
    kube: KubeEmulator, operator: dict[str, Any]
) -> None:
    kube.create(API, "eventschemas", NAMESPACE, schema_resource("orders-v", "op_orders", V1_FIELDS))
    first = wait_reason(kube, operator, "eventschemas", "orders-v", "Created")["status"]
    assert first["version"] == 1 and first["versions"] == [1]
    kube.patch_spec(
        API,
        "eventschemas",
        NAMESPACE,
        "orders-v",
        {"schema": schema_resource("x", "y", BROKEN_FIELDS)["spec"]["schema"]},
    )
    refused = wait_reason(kube, operator, "eventschemas", "orders-v", "Incompatible", "version 1 stays served")
    assert refused["status"]["version"] == 1 and refused["status"]["fingerprint"] == first["fingerprint"]
    assert refused["status"]["compatibility"]["result"] == "Incompatible"
    assert refused["status"]["compatibility"]["problems"]
    kube.patch_spec(
        API, "eventschemas", NAMESPACE, "orders-v", {"schema": schema_resource("x", "y", V2_FIELDS)["spec"]["schema"]}
    )
    evolved = wait_reason(kube, operator, "eventschemas", "orders-v", "Updated", "version 2")["status"]
    assert evolved["versions"] == [1, 2] and evolved["compatibility"]["result"] == "Compatible"
    assert evolved["fingerprint"] != first["fingerprint"]


def test_rolling_upgrade_loses_nothing_and_dead_letters_nothing(
    kube: KubeEmulator, operator: dict[str, Any], bootstrap: str
) -> None:
    """New producers write v2 while an old consumer (built with v1 only) still runs: it resolves v2 from the
    store the operator maintains, and a store outage is an exception to retry on, never a dead letter."""
    kube.create(API, "eventschemas", NAMESPACE, schema_resource("payments", "op_payments", V1_FIELDS))
    wait_reason(kube, operator, "eventschemas", "payments", "Created")
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("payments-topic", "op.payments", 1))
    wait_reason(kube, operator, "kafkatopics", "payments-topic", "Created")
    kube.patch_spec(
        API, "eventschemas", NAMESPACE, "payments", {"schema": schema_resource("x", "y", V2_FIELDS)["spec"]["schema"]}
    )
    wait_reason(kube, operator, "eventschemas", "payments", "Updated", "version 2")

    v1 = Schema.from_definition("op_payments", schema_resource("x", "y", V1_FIELDS)["spec"]["schema"])
    v2 = Schema.from_definition("op_payments", schema_resource("x", "y", V2_FIELDS)["spec"]["schema"])
    producer = Producer({"bootstrap.servers": bootstrap})
    old, new = AvroSerializer(v1), AvroSerializer(v2)
    for index in range(50):
        producer.produce("op.payments", value=old({"id": f"a{index}", "amount": index}))
        producer.produce("op.payments", value=new({"id": f"b{index}", "amount": index, "currency": "USD"}))
    assert producer.flush(10) == 0

    resolver = StoreWriterResolver({"bootstrap.servers": bootstrap}, timeout=10)
    consumer_repository = SchemaRepository([v1], resolver=resolver)  # the old consumer: v1 baked in
    decode = AvroDeserializer(consumer_repository, "op_payments")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "op-rolling", "enable.partition.eof": True})
    consumer.assign([TopicPartition("op.payments", 0, 0)])
    decoded, dead_letters = [], []
    try:
        while True:
            message = consumer.poll(5)
            assert message is not None, "timed out reading op.payments"
            if message.error():
                break  # partition EOF
            result = decode(message.value())
            (dead_letters if isinstance(result, DecodeError) else decoded).append(result)
    finally:
        consumer.close()
    assert dead_letters == []
    assert len(decoded) == 100
    assert {r.writer.fingerprint for r in decoded} == {v1.fingerprint, v2.fingerprint}
    assert resolver.reads == 1  # one store read for the whole run: the cache answers the rest
    assert all(set(r.record) == {"id", "amount"} for r in decoded)  # read as v1: the v2 field is dropped


# --- RBAC and the process -------------------------------------------------------------------------------------


def test_every_request_of_the_operator_is_one_the_role_grants(kube: KubeEmulator, operator: dict[str, Any]) -> None:
    """The verbs the running operator used are exactly ``API_ACCESS``, which the chart's Role grants."""
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("rbac", "op.rbac", 1))
    kube.create(API, "eventschemas", NAMESPACE, schema_resource("rbac", "op_rbac", V1_FIELDS))
    wait_reason(kube, operator, "kafkatopics", "rbac", "Created")
    wait_reason(kube, operator, "eventschemas", "rbac", "Created")
    wait_until(lambda: len(events_for(kube, "rbac")) >= 2, "the Events of both", operator)
    verb_of = {("GET", False): "list", ("GET", True): "get", ("POST", False): "create", ("PATCH", True): "patch"}
    used: dict[tuple[str, str], set[str]] = {}
    for request in kube.requests():
        if request.resource is None or not request.resource.plural:
            continue  # discovery: no permission needed
        if (request.headers.get("User-Agent") or "").startswith("Python-urllib"):
            continue  # this test's own kubectl
        method = str(request.method).upper().removeprefix("METHOD.")
        verb = "watch" if request.params.get("watch") == "true" else verb_of.get((method, request.name is not None))
        plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        used.setdefault((request.resource.group or "", plural), set()).add(str(verb))
    granted = {key: set(verbs) for key, verbs in API_ACCESS.items()}
    assert used == granted, f"used {used}, granted {granted}"


def test_metrics_and_liveness(kube: KubeEmulator, operator: dict[str, Any]) -> None:
    kube.create(API, "kafkatopics", NAMESPACE, topic_resource("metered", "op.metered", 1))
    wait_reason(kube, operator, "kafkatopics", "metered", "Created")
    assert http_status(operator["liveness"], "/healthz") == 200
    assert metric_totals(operator["metrics"]).get("lp_operator_reconciles_total", 0) > 0


def test_a_bad_variable_exits_2_naming_it() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "OPERATOR_DRIFT_INTERVAL_S": "-1", "KUBECONFIG": "/nonexistent"}
    completed = run_module("services.operator", env=env, timeout=60)
    assert completed.returncode == 2, completed.stderr
    assert "OPERATOR_DRIFT_INTERVAL_S" in completed.stderr
