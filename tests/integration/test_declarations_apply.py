"""apply_declarations against a real Kafka-protocol broker (a throwaway Tansu, in memory, on a free port)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from services.contracts.schema_store import SCHEMAS_TOPIC
from services.declarations.__main__ import main
from services.declarations.apply import ApplyReport, apply_declarations
from services.declarations.registry import KafkaSchemaStore, SchemaIncompatibleError, fingerprint
from services.declarations.resources import DeclarationError, load_declarations
from services.stack import LocalStack, StackSettings
from services.stack.settings import pick_free_ports

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    """A broker of its own: these tests create, alter and break topics."""
    state_dir = Path(tempfile.mkdtemp(prefix="lp-declarations-"))
    try:
        with LocalStack(StackSettings.with_free_ports(state_dir=state_dir), only=["broker"]) as broker_only:
            yield broker_only.bootstrap_servers
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def copy_declarations(target: Path) -> Path:
    shutil.copytree(REPO_ROOT / "deploy/k8s", target)
    return target


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def actions(report: ApplyReport) -> dict[str, str]:
    return {name: action for _, name, action, _ in report.rows()}


def details(report: ApplyReport) -> dict[str, str]:
    return {name: detail for _, name, _, detail in report.rows()}


def partitions(servers: str, topic: str) -> int:
    return len(AdminClient({"bootstrap.servers": servers}).list_topics(timeout=10).topics[topic].partitions)


def topic_config(servers: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": servers})
    (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=10).items()}


def test_repository_declarations_apply_and_evolve(bootstrap: str, tmp_path: Path) -> None:
    root = copy_declarations(tmp_path / "k8s")

    declared = load_declarations(root)
    first = apply_declarations(root, bootstrap)
    assert first.ok, first.table()
    expected = {SCHEMAS_TOPIC: "created"}
    expected |= {schema.subject: "registered" for schema in declared.schemas}
    expected |= {topic.topic_name: "created" for topic in declared.topics}
    assert actions(first) == expected
    assert partitions(bootstrap, "events.raw") == 16
    assert partitions(bootstrap, SCHEMAS_TOPIC) == 1
    config = topic_config(bootstrap, "events.raw")
    assert config["compression.type"] == "zstd" and config["retention.ms"] == "604800000"

    second = apply_declarations(root, bootstrap)
    assert second.ok, second.table()
    assert actions(second) == dict.fromkeys(expected, "unchanged")

    # A config change is applied in place.
    topic_file = root / "topics/events-raw.yaml"
    edit(topic_file, lambda d: d["spec"]["config"].update({"retention.ms": "86400000"}))
    updated = apply_declarations(root, bootstrap)
    assert updated.ok, updated.table()
    assert actions(updated)["events.raw"] == "updated"
    assert "retention.ms: 604800000 -> 86400000" in details(updated)["events.raw"]
    assert topic_config(bootstrap, "events.raw")["retention.ms"] == "86400000"
    assert actions(apply_declarations(root, bootstrap))["events.raw"] == "unchanged"

    # Partitions: Tansu has no CreatePartitions, which must be an error, not a silent no-op; fewer is refused.
    edit(topic_file, lambda d: d["spec"].update(partitions=20))
    grown = apply_declarations(root, bootstrap)
    assert not grown.ok and actions(grown)["events.raw"] == "error"
    assert "does not support CreatePartitions" in details(grown)["events.raw"]
    edit(topic_file, lambda d: d["spec"].update(partitions=8))
    shrunk = apply_declarations(root, bootstrap)
    assert "cannot decrease partitions from 16 to 8" in details(shrunk)["events.raw"]
    assert partitions(bootstrap, "events.raw") == 16
    edit(topic_file, lambda d: d["spec"].update(partitions=16))

    # A compatible schema change (new optional field with a default) becomes version 2.
    schema_file = root / "schemas/raw-event.yaml"
    optional = {"name": "campaign", "type": ["null", "string"], "default": None}
    edit(schema_file, lambda d: d["spec"]["schema"]["fields"].append(optional))
    evolved = apply_declarations(root, bootstrap)
    assert evolved.ok, evolved.table()
    assert actions(evolved)["raw_event"] == "registered"
    assert details(evolved)["raw_event"].startswith("version 2, BACKWARD")

    # An incompatible one (a type change) is refused with the reason, and nothing is registered.
    def retype_quantity(document: dict[str, Any]) -> None:
        field = next(f for f in document["spec"]["schema"]["fields"] if f["name"] == "quantity")
        field["type"] = ["null", "string"]

    edit(schema_file, retype_quantity)
    refused = apply_declarations(root, bootstrap)
    assert not refused.ok
    (schema_result,) = [result for result in refused.schemas if result.subject == "raw_event"]
    assert all(result.action == "unchanged" for result in refused.schemas if result is not schema_result)
    assert schema_result.action == "error" and "not BACKWARD compatible" in schema_result.message
    assert any("RawEvent.quantity" in problem for problem in schema_result.problems)
    assert "RawEvent.quantity" in refused.table()
    versions = KafkaSchemaStore(bootstrap).versions("raw_event")
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].fingerprint == fingerprint(versions[1].schema)
    assert any(f["name"] == "campaign" for f in versions[1].schema["fields"])


FORWARD_SCHEMA = """\
apiVersion: lambdapipeline.io/v1alpha1
kind: EventSchema
metadata:
  name: order
spec:
  subject: order_fwd
  compatibility: FORWARD
  schema:
    type: record
    name: Order
    fields:
      - {name: id, type: string}
      - {name: amount, type: double}
---
apiVersion: lambdapipeline.io/v1alpha1
kind: KafkaTopic
metadata:
  name: orders-fwd
spec:
  topicName: orders.fwd
  partitions: 3
  replicationFactor: 1
  config:
    cleanup.policy: delete
  valueSchema: order
"""


def test_forward_mode_refuses_removing_a_field_without_default(bootstrap: str, tmp_path: Path) -> None:
    declarations = tmp_path / "decl.yaml"
    declarations.write_text(FORWARD_SCHEMA)
    report = apply_declarations(tmp_path, bootstrap)
    assert report.ok, report.table()
    assert actions(report)["order_fwd"] == "registered"
    assert partitions(bootstrap, "orders.fwd") == 3

    declarations.write_text(FORWARD_SCHEMA.replace("      - {name: amount, type: double}\n", ""))
    refused = apply_declarations(tmp_path, bootstrap)
    (result,) = refused.schemas
    assert result.action == "error" and "not FORWARD compatible" in result.message
    assert result.problems == (
        "version 1 cannot read data written with the new schema: Order.amount: "
        "field is missing from the writer schema and the reader declares no default",
    )
    # Adding a field is fine under FORWARD (old readers skip it), even without a default.
    declarations.write_text(
        FORWARD_SCHEMA.replace("type: double}", "type: double}\n      - {name: note, type: string}")
    )
    accepted = apply_declarations(tmp_path, bootstrap)
    assert accepted.ok and actions(accepted)["order_fwd"] == "registered", accepted.table()


def test_schema_store_semantics(bootstrap: str) -> None:
    store = KafkaSchemaStore(bootstrap, topic="_lp_schemas_store_test", timeout=20)
    assert store.read_all() == {}  # the topic does not exist yet
    admin = AdminClient({"bootstrap.servers": bootstrap})
    from services.declarations.registry import SCHEMAS_TOPIC_SPEC
    from services.declarations.resources import TopicSpec
    from services.declarations.topics import reconcile_topics

    spec = TopicSpec(**{**SCHEMAS_TOPIC_SPEC.__dict__, "topic_name": store.topic, "replication_factor": 1})
    assert reconcile_topics(admin, [spec])[0].action == "created"
    assert store.read_all() == {}  # empty topic: partition EOF right away

    v1 = {"type": "record", "name": "T", "fields": [{"name": "a", "type": "int"}]}
    assert store.register("t", v1).registered
    assert not store.register("t", json.loads(json.dumps(v1))).registered  # same schema: no-op
    documented = {**v1, "doc": "only documentation changed"}
    assert not store.register("t", documented).registered
    # Same canonical form (the fingerprint ignores defaults) but different resolution: a new version.
    with_default = {"type": "record", "name": "T", "fields": [{"name": "a", "type": "int", "default": 0}]}
    assert fingerprint(with_default) == fingerprint(v1)
    assert store.register("t", with_default).version == 2

    with pytest.raises(SchemaIncompatibleError) as caught:
        store.register("t", {"type": "record", "name": "T", "fields": [{"name": "a", "type": "string"}]}, "FULL")
    assert "T.a" in str(caught.value)
    history = store.read_all()
    assert [v.version for v in history["t"]] == [1, 2]
    assert history["t"][0].compatibility == "BACKWARD" and history["t"][0].registered_at


def test_cli_apply_prints_a_table(bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_declarations(tmp_path / "k8s")
    assert main(["apply", "--bootstrap", bootstrap, "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["KIND", "NAME", "RESULT", "DETAIL"]
    assert "events.raw" in out and "raw_event" in out


def test_invalid_declarations_apply_nothing(bootstrap: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(FORWARD_SCHEMA.replace("partitions: 3", "partitions: 0"))
    with pytest.raises(DeclarationError, match=r"spec\.partitions"):
        apply_declarations(tmp_path, bootstrap)


def test_unreachable_broker_is_reported_per_object(tmp_path: Path) -> None:
    root = copy_declarations(tmp_path / "k8s")
    report = apply_declarations(root, f"127.0.0.1:{pick_free_ports(1)[0]}", timeout=2)
    assert not report.ok
    assert set(actions(report).values()) == {"error"}
