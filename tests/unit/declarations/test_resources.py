"""Loading and validating the KafkaTopic / EventSchema declarations."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from services.declarations.avro_compat import Compatibility
from services.declarations.resources import DeclarationError, load_declarations

REPO_ROOT = Path(__file__).resolve().parents[3]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


SCHEMA_DOC = """\
apiVersion: lambdapipeline.io/v1alpha1
kind: EventSchema
metadata:
  name: {name}
spec:
  subject: {subject}
  compatibility: {mode}
  schema:
    type: record
    name: Thing
    fields:
      - name: id
        type: string
"""

TOPIC_DOC = """\
apiVersion: lambdapipeline.io/v1alpha1
kind: KafkaTopic
metadata:
  name: {name}
spec:
  topicName: {topic}
  partitions: 3
  replicationFactor: 1
  config:
    retention.ms: "1000"
  valueSchema: thing
"""


def schema_doc(name: str = "thing", subject: str = "thing", mode: str = "FULL") -> str:
    return SCHEMA_DOC.format(name=name, subject=subject, mode=mode)


def topic_doc(name: str = "things", topic: str = "things.v1") -> str:
    return TOPIC_DOC.format(name=name, topic=topic)


def problems_of(root: Path) -> list[str]:
    with pytest.raises(DeclarationError) as caught:
        load_declarations(root)
    return caught.value.problems


def test_repository_declarations_load() -> None:
    declarations = load_declarations(REPO_ROOT / "deploy" / "k8s")
    (topic,) = [t for t in declarations.topics if t.topic_name == "events.raw"]
    assert topic.name == "events-raw"
    assert topic.partitions == 16
    assert topic.config["compression.type"] == "zstd"
    assert topic.config["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert topic.value_schema == "raw-event"
    schema = declarations.schema("raw-event")
    assert schema.subject == "raw_event"
    assert schema.source_file == "schemas/avro/raw_event.avsc"
    assert schema.schema == json.loads((REPO_ROOT / "schemas/avro/raw_event.avsc").read_text())
    assert declarations.schema_for_subject("raw_event") is schema


def test_multi_document_files_and_foreign_documents(tmp_path: Path) -> None:
    write(
        tmp_path,
        "nested/dir/all.yaml",
        schema_doc()
        + "---\n"
        + topic_doc()
        + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n"
        + "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: []\n---\n",
    )
    write(tmp_path, "notes.txt", "not yaml: [")
    declarations = load_declarations(tmp_path)
    assert [t.topic_name for t in declarations.topics] == ["things.v1"]
    (schema,) = declarations.schemas
    assert schema.compatibility is Compatibility.FULL
    assert declarations.topics[0].origin == tmp_path / "nested/dir/all.yaml"


def test_compatibility_defaults_to_backward(tmp_path: Path) -> None:
    write(tmp_path, "s.yaml", schema_doc().replace("  compatibility: FULL\n", ""))
    assert load_declarations(tmp_path).schemas[0].compatibility is Compatibility.BACKWARD


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("  topicName: things.v1\n", "", "spec.topicName: required"),
        ("topicName: things.v1", "topicName: 'bad name!'", "spec.topicName: 'bad name!' does not match"),
        ("topicName: things.v1", "topicName: '..'", "spec.topicName: '..' is not a legal"),
        ("partitions: 3", "partitions: 0", "spec.partitions: must be between 1 and"),
        ("partitions: 3", "partitions: '3'", "spec.partitions: must be an integer, got str"),
        ("partitions: 3", "partitions: true", "spec.partitions: must be an integer, got bool"),
        ("replicationFactor: 1", "replicationFactor: 0", "spec.replicationFactor: must be between 1"),
        ('retention.ms: "1000"', "retention.ms: 1000", "spec.config.retention.ms: must be a string (quote it"),
        ("  valueSchema: thing\n", "  valueSchema: thing\n  partitionz: 1\n", "spec.partitionz: unknown field"),
        ("valueSchema: thing", "valueSchema: missing", "spec.valueSchema: no EventSchema named 'missing'"),
        ("valueSchema: thing", "valueSchema: Thing_1", "spec.valueSchema: 'Thing_1' does not match"),
        ("name: things", "name: Things", "metadata.name must be a DNS-1123 subdomain"),
        ("lambdapipeline.io/v1alpha1", "lambdapipeline.io/v1beta9", "apiVersion 'lambdapipeline.io/v1beta9' is not"),
        ("kind: KafkaTopic", "kind: KafkaTable", "unknown kind 'KafkaTable'"),
    ],
)
def test_topic_problems_name_file_and_field(tmp_path: Path, replace: str, by: str, expected: str) -> None:
    write(tmp_path, "schema.yaml", schema_doc())
    path = write(tmp_path, "topic.yaml", topic_doc().replace(replace, by))
    problems = problems_of(tmp_path)
    assert any(expected in problem and str(path) in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("compatibility: FULL", "compatibility: SIDEWAYS", "spec.compatibility: 'SIDEWAYS' is not one of"),
        ("  subject: thing\n", "", "spec.subject: required"),
        ("        type: string", "        type: strang", "spec.schema: not a valid Avro schema"),
        ("    type: record\n    name: Thing\n", "    type: record\n", "spec.schema: not a valid Avro schema"),
        ("        type: string", "        type: ['null', string]\n        default: x", "first union branch"),
    ],
)
def test_schema_problems_name_file_and_field(tmp_path: Path, replace: str, by: str, expected: str) -> None:
    path = write(tmp_path, "schema.yaml", schema_doc().replace(replace, by))
    problems = problems_of(tmp_path)
    assert any(expected in problem and str(path) in problem for problem in problems), problems


def test_schema_must_be_an_object(tmp_path: Path) -> None:
    write(tmp_path, "s.yaml", schema_doc().split("  schema:")[0] + "  schema: string\n")
    assert any("spec.schema: required: the Avro schema as an object" in p for p in problems_of(tmp_path))


def test_every_problem_is_collected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", topic_doc().replace("partitions: 3", "partitions: -1"))
    write(tmp_path, "a2.yaml", topic_doc(name="other", topic="other").replace("thing", "nope"))
    write(tmp_path, "b.yaml", schema_doc(mode="WHATEVER"))
    write(tmp_path, "c.yaml", "key: [unclosed\n")
    problems = problems_of(tmp_path)
    assert len(problems) == 4, problems
    assert any("invalid YAML" in p and "c.yaml" in p for p in problems)


def test_uniqueness(tmp_path: Path) -> None:
    write(tmp_path, "s1.yaml", schema_doc())
    write(tmp_path, "s2.yaml", schema_doc(name="thing2"))  # same subject
    write(tmp_path, "t1.yaml", topic_doc())
    write(tmp_path, "t2.yaml", topic_doc(name="things-again"))  # same topicName
    write(tmp_path, "t3.yaml", topic_doc(topic="other"))  # same resource name
    problems = "\n".join(problems_of(tmp_path))
    assert "spec.subject 'thing' is also declared in" in problems
    assert "spec.topicName 'things.v1' is also declared in" in problems
    assert "metadata.name 'things' is also declared in" in problems


def test_dot_and_underscore_topic_names_collide(tmp_path: Path) -> None:
    write(tmp_path, "s.yaml", schema_doc())
    write(tmp_path, "t1.yaml", topic_doc())
    write(tmp_path, "t2.yaml", topic_doc(name="other", topic="things_v1"))
    (problem,) = problems_of(tmp_path)
    assert "collide in Kafka metrics" in problem


def test_missing_directory() -> None:
    with pytest.raises(DeclarationError, match="not a directory"):
        load_declarations(Path("/nonexistent/declarations"))


def test_error_message_lists_problems(tmp_path: Path) -> None:
    write(tmp_path, "t.yaml", topic_doc())
    with pytest.raises(DeclarationError, match=r"invalid declarations:\n  .*t\.yaml: KafkaTopic/things: spec\.value"):
        load_declarations(tmp_path)
