"""KafkaTopic spec.valueEncoding: avro-single-object (default) or json."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from services.declarations.resources import (
    VALUE_ENCODING_AVRO,
    VALUE_ENCODING_JSON,
    VALUE_ENCODINGS,
    DeclarationError,
    TopicSpec,
    load_declarations,
)

REPO_ROOT = Path(__file__).resolve().parents[3]

TOPIC = """\
apiVersion: lambdapipeline.io/v1alpha1
kind: KafkaTopic
metadata:
  name: things
spec:
  topicName: things.v1
  partitions: 1
  replicationFactor: 1
"""


def load_topic(tmp_path: Path, extra: str = "") -> TopicSpec:
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TOPIC) + extra)
    (topic,) = load_declarations(tmp_path).topics
    return topic


def test_default_is_avro_single_object(tmp_path: Path) -> None:
    assert load_topic(tmp_path).value_encoding == VALUE_ENCODING_AVRO


def test_json_is_accepted(tmp_path: Path) -> None:
    assert load_topic(tmp_path, "  valueEncoding: json\n").value_encoding == VALUE_ENCODING_JSON


@pytest.mark.parametrize("value", ["protobuf", "JSON", "1"])
def test_other_encodings_are_refused(tmp_path: Path, value: str) -> None:
    (tmp_path / "t.yaml").write_text(TOPIC + f"  valueEncoding: '{value}'\n")
    with pytest.raises(DeclarationError) as caught:
        load_declarations(tmp_path)
    assert any("spec.valueEncoding" in problem and "is not one of" in problem for problem in caught.value.problems)


def test_crd_declares_the_same_encodings() -> None:
    crd = yaml.safe_load((REPO_ROOT / "deploy/k8s/crds/kafkatopics.lambdapipeline.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    field = spec["properties"]["valueEncoding"]
    assert field["enum"] == list(VALUE_ENCODINGS)
    assert field["default"] == VALUE_ENCODING_AVRO
    assert "valueEncoding" not in spec["required"]


def test_repository_cdc_topics_are_json() -> None:
    topics = {t.topic_name: t for t in load_declarations(REPO_ROOT / "deploy" / "k8s").topics}
    assert topics["events.raw"].value_encoding == VALUE_ENCODING_AVRO
    for table in ("users", "products", "transactions"):
        topic = topics[f"cdc.postgres.{table}"]
        assert topic.value_encoding == VALUE_ENCODING_JSON
        assert topic.value_schema == f"cdc-{table}"
        assert topic.replication_factor == 3
