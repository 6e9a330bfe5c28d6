"""Load the ``lambdapipeline.io`` custom resources (KafkaTopic, EventSchema) from YAML files.

The same declarations are reconciled by the operator in Kubernetes and applied by local mode, so this
module validates them as strictly as the CRD's openAPI schema does (and adds the cross-resource checks a
CRD cannot express), collecting every problem with the file and field it comes from.

Names are global here: local mode applies every namespace into one Kafka cluster, and Kafka topic names
and schema subjects are cluster-wide anyway, so resource names, topic names and subjects must be unique
across all files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import yaml

from services.declarations.avro_compat import Compatibility
from services.declarations.avro_compat import parse as parse_avro

API_GROUP = "lambdapipeline.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND_TOPIC = "KafkaTopic"
KIND_SCHEMA = "EventSchema"
DEFAULT_COMPATIBILITY = Compatibility.BACKWARD

_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOPIC_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_SUBJECT_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_MAX_PARTITIONS = 10_000
# How a topic's record values are encoded. Avro single-object encoding (the fingerprint header plus binary Avro)
# is the platform default; "json" means the value is the plain JSON rendering of the Avro record named by
# valueSchema (unions not wrapped, as Debezium writes its envelopes), so the schema is the contract but not the codec.
VALUE_ENCODING_AVRO = "avro-single-object"
VALUE_ENCODING_JSON = "json"
VALUE_ENCODINGS = (VALUE_ENCODING_AVRO, VALUE_ENCODING_JSON)
# What the operator does to the Kafka topic when its KafkaTopic is deleted (local apply never deletes).
DELETION_RETAIN = "Retain"
DELETION_DELETE = "Delete"
DELETION_POLICIES = (DELETION_RETAIN, DELETION_DELETE)


class DeclarationError(ValueError):
    """One or more declarations are invalid; ``problems`` lists each as ``file: resource: field: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid declarations:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class SchemaSpec:
    name: str  # resource name, e.g. raw-event
    subject: str  # registry subject, e.g. raw_event
    schema: Mapping[str, Any]  # the Avro schema as JSON data
    compatibility: Compatibility = DEFAULT_COMPATIBILITY
    source_file: str | None = None
    namespace: str | None = None
    origin: Path | None = None  # the YAML file it was declared in


@dataclass(frozen=True)
class TopicSpec:
    name: str  # resource name, e.g. events-raw
    topic_name: str  # Kafka name, e.g. events.raw
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)
    key_schema: str | None = None
    value_schema: str | None = None
    description: str = ""
    namespace: str | None = None
    origin: Path | None = None
    value_encoding: str = VALUE_ENCODING_AVRO
    deletion_policy: str = DELETION_RETAIN


@dataclass(frozen=True)
class Declarations:
    topics: list[TopicSpec]
    schemas: list[SchemaSpec]

    def schema(self, name: str) -> SchemaSpec:
        return next(schema for schema in self.schemas if schema.name == name)

    def schema_for_subject(self, subject: str) -> SchemaSpec | None:
        return next((schema for schema in self.schemas if schema.subject == subject), None)


def load_declarations(root: Path) -> Declarations:
    """Every KafkaTopic and EventSchema under ``root`` (recursively, ``*.yaml``/``*.yml``).

    Documents of other API groups (CRDs, kustomization files) are skipped. Raises ``DeclarationError``
    listing every problem found.
    """
    if not root.is_dir():
        raise DeclarationError([f"{root}: not a directory"])
    problems: list[str] = []
    topics: list[TopicSpec] = []
    schemas: list[SchemaSpec] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        for document in _documents(path, problems):
            resource = parse_document(document, path, problems)
            if isinstance(resource, TopicSpec):
                topics.append(resource)
            elif isinstance(resource, SchemaSpec):
                schemas.append(resource)
    problems += cross_check(topics, schemas)
    if problems:
        raise DeclarationError(problems)
    return Declarations(topics, schemas)


def _documents(path: Path, problems: list[str]) -> Iterator[Any]:
    try:
        yield from [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except yaml.YAMLError as error:
        problems.append(f"{path}: invalid YAML: {' '.join(str(error).split())}")


def parse_document(document: Any, origin: Path, problems: list[str]) -> TopicSpec | SchemaSpec | None:
    """Parse one YAML document; None for documents of other API groups or invalid ones (``problems``)."""
    if not isinstance(document, dict):
        return None
    api_version = document.get("apiVersion")
    if not isinstance(api_version, str) or api_version.split("/")[0] != API_GROUP:
        return None
    kind = document.get("kind")
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    name = metadata.get("name")
    where = f"{origin}: {kind}/{name or '?'}"
    before = len(problems)
    if api_version != API_VERSION:
        problems.append(f"{where}: apiVersion {api_version!r} is not supported (expected {API_VERSION})")
        return None
    if kind not in (KIND_TOPIC, KIND_SCHEMA):
        problems.append(f"{where}: unknown kind {kind!r} (expected {KIND_TOPIC} or {KIND_SCHEMA})")
        return None
    if not isinstance(name, str) or not _DNS_SUBDOMAIN_RE.match(name) or len(name) > 253:
        problems.append(f"{where}: metadata.name must be a DNS-1123 subdomain (lowercase, digits, '-', '.')")
    namespace = metadata.get("namespace")
    spec = document.get("spec")
    if not isinstance(spec, dict):
        problems.append(f"{where}: spec: required object")
        return None
    checker = _SpecChecker(where, spec, problems)
    if kind == KIND_TOPIC:
        resource: TopicSpec | SchemaSpec | None = _topic(checker, name, namespace, origin)
    else:
        resource = _schema(checker, name, namespace, origin)
    return resource if len(problems) == before else None


class _SpecChecker:
    """Typed access to spec fields that records a problem per bad field instead of raising."""

    def __init__(self, where: str, spec: dict[str, Any], problems: list[str]) -> None:
        self.where, self.spec, self.problems = where, spec, problems

    def fail(self, field_name: str, reason: str) -> None:
        self.problems.append(f"{self.where}: spec.{field_name}: {reason}")

    def string(self, key: str, *, required: bool, pattern: re.Pattern[str] | None = None) -> str | None:
        value = self.spec.get(key)
        if value is None:
            if required:
                self.fail(key, "required")
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {type(value).__name__}")
            return None
        if pattern is not None and not pattern.match(value):
            self.fail(key, f"{value!r} does not match {pattern.pattern}")
            return None
        return value

    def integer(self, key: str, *, minimum: int, maximum: int) -> int | None:
        value = self.spec.get(key)
        if value is None:
            self.fail(key, "required")
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {type(value).__name__}")
            return None
        if not minimum <= value <= maximum:
            self.fail(key, f"must be between {minimum} and {maximum}, got {value}")
            return None
        return value

    def unknown_fields(self, known: set[str]) -> None:
        for key in sorted(set(self.spec) - known):
            self.fail(key, "unknown field")


def _topic(checker: _SpecChecker, name: Any, namespace: Any, origin: Path) -> TopicSpec | None:
    checker.unknown_fields(
        {
            "topicName",
            "partitions",
            "replicationFactor",
            "config",
            "keySchema",
            "valueSchema",
            "valueEncoding",
            "description",
            "deletionPolicy",
        }
    )
    topic_name = checker.string("topicName", required=True, pattern=_TOPIC_NAME_RE)
    if topic_name in (".", ".."):
        checker.fail("topicName", f"{topic_name!r} is not a legal Kafka topic name")
    partitions = checker.integer("partitions", minimum=1, maximum=_MAX_PARTITIONS)
    replication_factor = checker.integer("replicationFactor", minimum=1, maximum=32767)
    raw_config = checker.spec.get("config") or {}
    config: dict[str, str] = {}
    if not isinstance(raw_config, dict):
        checker.fail("config", "must be a map of string to string")
    else:
        for key, value in raw_config.items():
            # Kafka configs are strings on the wire; YAML turns 604800000 into an int, so insist on quotes
            # rather than guess (true/1.0 would not round-trip).
            if not isinstance(key, str) or not isinstance(value, str):
                checker.fail(f"config.{key}", f"must be a string (quote it in YAML), got {type(value).__name__}")
            else:
                config[key] = value
    key_schema = checker.string("keySchema", required=False, pattern=_DNS_SUBDOMAIN_RE)
    value_schema = checker.string("valueSchema", required=False, pattern=_DNS_SUBDOMAIN_RE)
    description = checker.string("description", required=False) or ""
    value_encoding = checker.string("valueEncoding", required=False) or VALUE_ENCODING_AVRO
    if value_encoding not in VALUE_ENCODINGS:
        checker.fail("valueEncoding", f"{value_encoding!r} is not one of {list(VALUE_ENCODINGS)}")
    deletion_policy = checker.string("deletionPolicy", required=False) or DELETION_RETAIN
    if deletion_policy not in DELETION_POLICIES:
        checker.fail("deletionPolicy", f"{deletion_policy!r} is not one of {list(DELETION_POLICIES)}")
    if topic_name is None or partitions is None or replication_factor is None:
        return None
    return TopicSpec(
        name=name,
        topic_name=topic_name,
        partitions=partitions,
        replication_factor=replication_factor,
        config=config,
        key_schema=key_schema,
        value_schema=value_schema,
        description=description,
        namespace=namespace,
        origin=origin,
        value_encoding=value_encoding,
        deletion_policy=deletion_policy,
    )


def _schema(checker: _SpecChecker, name: Any, namespace: Any, origin: Path) -> SchemaSpec | None:
    checker.unknown_fields({"subject", "compatibility", "schema", "sourceFile"})
    subject = checker.string("subject", required=True, pattern=_SUBJECT_RE)
    raw_mode = checker.string("compatibility", required=False) or DEFAULT_COMPATIBILITY.value
    compatibility: Compatibility | None = None
    try:
        compatibility = Compatibility(raw_mode)
    except ValueError:
        checker.fail("compatibility", f"{raw_mode!r} is not one of {[mode.value for mode in Compatibility]}")
    source_file = checker.string("sourceFile", required=False)
    schema = checker.spec.get("schema")
    if not isinstance(schema, dict):
        checker.fail("schema", "required: the Avro schema as an object")
        return None
    try:
        fastavro.parse_schema(schema, _write_hint=False)
        parse_avro(schema)  # stricter than fastavro: union defaults, logical types
    except Exception as error:  # fastavro raises assorted types; any of them means an invalid schema
        checker.fail("schema", f"not a valid Avro schema: {error}")
        return None
    if subject is None or compatibility is None:
        return None
    return SchemaSpec(
        name=name,
        subject=subject,
        schema=schema,
        compatibility=compatibility,
        source_file=source_file,
        namespace=namespace,
        origin=origin,
    )


def cross_check(topics: list[TopicSpec], schemas: list[SchemaSpec]) -> list[str]:
    """Problems that involve several resources: references and uniqueness."""
    problems: list[str] = []
    schema_names = {schema.name for schema in schemas}
    for kind, resources in ((KIND_TOPIC, topics), (KIND_SCHEMA, schemas)):
        problems += _duplicates(kind, "metadata.name", [(r.name, r.origin) for r in resources])
    problems += _duplicates(KIND_TOPIC, "spec.topicName", [(t.topic_name, t.origin) for t in topics])
    problems += _duplicates(KIND_SCHEMA, "spec.subject", [(s.subject, s.origin) for s in schemas])
    # Kafka maps '.' and '_' to the same metric name, so such topics collide in monitoring.
    by_metric_name: dict[str, set[str]] = {}
    for topic in topics:
        by_metric_name.setdefault(topic.topic_name.replace(".", "_"), set()).add(topic.topic_name)
    for colliding in (sorted(names) for names in by_metric_name.values() if len(names) > 1):
        problems.append(f"{KIND_TOPIC}: topic names {colliding} collide in Kafka metrics ('.' and '_' are equal)")
    for topic in topics:
        for key, reference in (("keySchema", topic.key_schema), ("valueSchema", topic.value_schema)):
            if reference is not None and reference not in schema_names:
                problems.append(
                    f"{topic.origin}: {KIND_TOPIC}/{topic.name}: spec.{key}: "
                    f"no {KIND_SCHEMA} named {reference!r} is declared"
                )
    return problems


def _duplicates(kind: str, what: str, values: list[tuple[str, Path | None]]) -> list[str]:
    seen: dict[str, Path | None] = {}
    problems = []
    for value, origin in values:
        if value in seen:
            problems.append(f"{origin}: {kind}: {what} {value!r} is also declared in {seen[value]}")
        else:
            seen[value] = origin
    return problems
