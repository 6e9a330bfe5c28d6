"""A registry-less schema store: every schema version is a record in the Kafka topic ``_lp_schemas``.

The record format, the reader and the consumers' resolver are in ``services.contracts.schema_store`` (the wire
contract every consumer may read); this module writes. The topic must keep records forever and must NOT be
compacted (compaction would keep only the latest version of each subject and lose the history that transitive
checks need).

Writes assume a single writer at a time (the operator, or local mode at start), which is what the
deployment guarantees; the version number is the subject's history length + 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fastavro
from confluent_kafka import KafkaError, Producer

from services.contracts.schema_store import SCHEMAS_TOPIC, SchemaStoreError, SchemaVersion, read_schema_versions
from services.declarations.avro_compat import Compatibility, Incompatibility, check_compatibility
from services.declarations.resources import TopicSpec

SCHEMAS_TOPIC_SPEC = TopicSpec(
    name="lp-schemas",
    topic_name=SCHEMAS_TOPIC,
    partitions=1,
    replication_factor=3,
    config={"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
    description="Internal: every registered schema version (lambda-pipeline registry-less schema store).",
)


class SchemaIncompatibleError(Exception):
    """A new schema version breaks the subject's compatibility mode."""

    def __init__(self, subject: str, mode: Compatibility, problems: list[Incompatibility]) -> None:
        self.subject, self.mode, self.problems = subject, mode, problems
        reasons = "\n  ".join(str(problem) for problem in problems)
        super().__init__(f"schema for subject {subject!r} is not {mode.value} compatible:\n  {reasons}")


@dataclass(frozen=True)
class RegisterResult:
    subject: str
    version: int
    fingerprint: str
    registered: bool  # False: an identical schema was already the latest version

    @property
    def action(self) -> str:
        return "registered" if self.registered else "unchanged"


def fingerprint(schema: Mapping[str, Any] | list[Any] | str) -> str:
    """CRC-64-AVRO fingerprint (hex) of the schema's Parsing Canonical Form."""
    parsed = fastavro.parse_schema(_plain(schema), _write_hint=False)
    return fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(parsed), "CRC-64-AVRO")


def schema_identity(schema: Any) -> str:
    """What makes two schemas "the same version": everything except ``doc``.

    The fingerprint alone is not enough: the Parsing Canonical Form drops defaults, aliases and logical
    types, which all change how data resolves, so a change to them must be a new version.
    """
    return json.dumps(_without_docs(_plain(schema)), sort_keys=True, separators=(",", ":"))


class KafkaSchemaStore:
    """Schema versions per subject, kept in ``topic``; see the module docstring."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = SCHEMAS_TOPIC,
        timeout: float = 30.0,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.timeout = timeout
        self._client_config = {"bootstrap.servers": bootstrap_servers, **(client_config or {})}

    def read_all(self) -> dict[str, list[SchemaVersion]]:
        """Every subject's versions, oldest first, read from the beginning of the topic to its end."""
        return read_schema_versions(self._client_config, topic=self.topic, timeout=self.timeout)

    def versions(self, subject: str) -> list[SchemaVersion]:
        return self.read_all().get(subject, [])

    def register(
        self,
        subject: str,
        schema: Mapping[str, Any],
        compatibility: Compatibility | str = Compatibility.BACKWARD,
        *,
        history: list[SchemaVersion] | None = None,
    ) -> RegisterResult:
        """Append ``schema`` as the subject's next version unless it is already the latest one.

        Raises ``SchemaIncompatibleError`` (nothing written) when the change breaks ``compatibility``.
        ``history`` avoids re-reading the topic when the caller already has it.
        """
        mode = Compatibility(compatibility)
        versions = history if history is not None else self.versions(subject)
        new_fingerprint = fingerprint(schema)
        if versions:
            latest = versions[-1]
            if latest.fingerprint == new_fingerprint and schema_identity(latest.schema) == schema_identity(schema):
                return RegisterResult(subject, latest.version, new_fingerprint, registered=False)
        problems = check_compatibility(
            schema, [v.schema for v in versions], mode, labels=[f"version {v.version}" for v in versions]
        )
        if problems:
            raise SchemaIncompatibleError(subject, mode, problems)
        record = SchemaVersion(
            subject=subject,
            version=(versions[-1].version + 1) if versions else 1,
            schema=_plain(schema),
            fingerprint=new_fingerprint,
            compatibility=mode.value,
            registered_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        self._append(record)
        return RegisterResult(subject, record.version, new_fingerprint, registered=True)

    def _append(self, record: SchemaVersion) -> None:
        producer = Producer({**self._client_config, "acks": "all", "enable.idempotence": True})
        delivery_errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: Any) -> None:
            if error is not None:
                delivery_errors.append(error)

        producer.produce(self.topic, key=record.subject.encode(), value=record.to_json(), on_delivery=on_delivery)
        pending = producer.flush(self.timeout)
        if pending or delivery_errors:
            reason = delivery_errors[0] if delivery_errors else f"not delivered within {self.timeout}s"
            raise SchemaStoreError(f"writing {record.subject} v{record.version} to {self.topic}: {reason}")


def _plain(schema: Any) -> Any:
    """A JSON-only deep copy (YAML-loaded mappings, tuples) so hashing and dumping behave the same."""
    return json.loads(json.dumps(schema))


def _without_docs(node: Any) -> Any:
    if isinstance(node, dict):
        # Defaults are data, not schema: a "doc" key inside one is kept.
        return {key: value if key == "default" else _without_docs(value) for key, value in node.items() if key != "doc"}
    if isinstance(node, list):
        return [_without_docs(item) for item in node]
    return node
