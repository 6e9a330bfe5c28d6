"""Schema-store helpers that need no broker: fingerprints, version identity, record format, report table."""

from __future__ import annotations

import json
from pathlib import Path

import fastavro

from services.contracts.schema_store import SchemaVersion
from services.declarations.apply import ApplyReport, SchemaResult
from services.declarations.registry import SCHEMAS_TOPIC_SPEC, fingerprint, schema_identity
from services.declarations.topics import TopicResult
from services.kit.avro import schema_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[3]
RAW_EVENT = json.loads((REPO_ROOT / "schemas/avro/raw_event.avsc").read_text())


def test_fingerprint_is_the_one_payloads_carry() -> None:
    """The store's fingerprint must name the same schema as the single-object encoding header."""
    assert fingerprint(RAW_EVENT) == f"{schema_fingerprint(fastavro.parse_schema(RAW_EVENT)):016x}"


def test_identity_ignores_docs_but_not_defaults_aliases_or_logical_types() -> None:
    base = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}]}
    documented = {**base, "doc": "x", "fields": [{"name": "a", "type": "long", "doc": "y"}]}
    assert schema_identity(documented) == schema_identity(base)
    for variant in (
        {**base, "fields": [{"name": "a", "type": "long", "default": 0}]},
        {**base, "aliases": ["Old"]},
        {**base, "fields": [{"name": "a", "type": {"type": "long", "logicalType": "timestamp-millis"}}]},
    ):
        assert fingerprint(variant) == fingerprint(base)  # the canonical form cannot tell them apart...
        assert schema_identity(variant) != schema_identity(base)  # ...so identity must


def test_identity_keeps_doc_keys_inside_defaults() -> None:
    with_doc_key = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "m", "type": {"type": "map", "values": "string"}, "default": {"doc": "v"}}],
    }
    without = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "m", "type": {"type": "map", "values": "string"}, "default": {}}],
    }
    assert schema_identity(with_doc_key) != schema_identity(without)


def test_version_record_round_trips_as_json() -> None:
    version = SchemaVersion(
        "raw_event", 3, RAW_EVENT, fingerprint(RAW_EVENT), "BACKWARD", "2026-11-22T00:00:00.000+00:00"
    )
    payload = version.to_json()
    assert set(json.loads(payload)) == {"subject", "version", "schema", "fingerprint", "compatibility", "registered_at"}
    assert SchemaVersion.from_json(payload) == version


def test_schemas_topic_keeps_history() -> None:
    assert SCHEMAS_TOPIC_SPEC.topic_name == "_lp_schemas" and SCHEMAS_TOPIC_SPEC.partitions == 1
    assert SCHEMAS_TOPIC_SPEC.config["cleanup.policy"] == "delete"  # compaction would drop old versions
    assert SCHEMAS_TOPIC_SPEC.config["retention.ms"] == "-1"


def test_report_table() -> None:
    report = ApplyReport(
        internal_topics=[TopicResult("_lp_schemas", "unchanged")],
        schemas=[SchemaResult("raw-event", "raw_event", "error", "refused", problems=("RawEvent.x: bad",))],
        topics=[TopicResult("events.raw", "created", "16 partitions, replication 3")],
    )
    assert not report.ok
    assert report.table().splitlines() == [
        "KIND         NAME         RESULT     DETAIL",
        "KafkaTopic   _lp_schemas  unchanged",
        "EventSchema  raw_event    error      refused",
        "KafkaTopic   events.raw   created    16 partitions, replication 3",
        "    raw_event: RawEvent.x: bad",
    ]
    assert str(report) == report.table()
