"""The schema store on the wire: the ``_lp_schemas`` topic, its record format, its reader, and the resolver that
lets a consumer decode a writer schema it was not built with.

One partition keeps a total order; key = subject, value = JSON
``{subject, version, schema, fingerprint, compatibility, registered_at}``. The operator (and local mode at start)
writes it through ``services.declarations.registry``; every consumer may read it. Reading never trusts
watermarks (Tansu's ListOffsets "latest" is wrong): the partition is assigned without a consumer group, read
from the beginning until librdkafka reports partition EOF.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.avro import SchemaStoreUnavailable, WriterSchema
from services.kit.config import OptionalBrokerList, ServiceSettings
from services.kit.kafka import client_config

SCHEMAS_TOPIC = "_lp_schemas"


class SchemaStoreError(SchemaStoreUnavailable):
    """The store could not be read or written (broker unreachable, timeout, corrupt record)."""


@dataclass(frozen=True)
class SchemaVersion:
    subject: str
    version: int
    schema: dict[str, Any]
    fingerprint: str  # CRC-64-AVRO of the Parsing Canonical Form, hex
    compatibility: str
    registered_at: str  # ISO-8601 UTC

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> SchemaVersion:
        data = json.loads(payload)
        return cls(
            subject=data["subject"],
            version=int(data["version"]),
            schema=data["schema"],
            fingerprint=data["fingerprint"],
            compatibility=data["compatibility"],
            registered_at=data["registered_at"],
        )


def read_schema_versions(
    client_config: Mapping[str, Any], *, topic: str = SCHEMAS_TOPIC, timeout: float = 30.0
) -> dict[str, list[SchemaVersion]]:
    """Every subject's versions, oldest first, read from the beginning of ``topic`` to its end.

    An absent topic is an empty store. Raises ``SchemaStoreError`` when the broker cannot be reached or read.
    """
    if not _topic_exists(client_config, topic, timeout):
        return {}
    consumer = Consumer(
        {
            **client_config,
            # Required by the client but unused: assign() fetches without joining or committing.
            "group.id": "lp-schema-store-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # At the end of the log a fetch waits this long for new data before EOF is reported.
            "fetch.wait.max.ms": 50,
        }
    )
    history: dict[str, list[SchemaVersion]] = {}
    deadline = time.monotonic() + timeout
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while True:
            if time.monotonic() > deadline:
                raise SchemaStoreError(f"timed out reading {topic} to its end after {timeout}s")
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    break
                if error.retriable():
                    continue
                raise SchemaStoreError(f"reading {topic}: {error}")
            if message.value() is None:
                continue  # tombstone: never written by the store, tolerated
            try:
                version = SchemaVersion.from_json(message.value())
            except (ValueError, KeyError, TypeError) as decode_error:
                raise SchemaStoreError(
                    f"{topic} offset {message.offset()}: unreadable record: {decode_error}"
                ) from decode_error
            history.setdefault(version.subject, []).append(version)
    finally:
        consumer.close()
    return history


def _topic_exists(client_config: Mapping[str, Any], topic: str, timeout: float) -> bool:
    admin = AdminClient(dict(client_config))
    try:
        # All topics, not list_topics(topic=...): a named metadata request may auto-create the topic.
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as error:
        raise SchemaStoreError(f"cannot reach Kafka at {client_config.get('bootstrap.servers')}: {error}") from error
    found = metadata.topics.get(topic)
    return found is not None and found.error is None and bool(found.partitions)


class StoreWriterResolver:
    """Finds writer schemas by fingerprint in the schema store, for ``services.kit.avro.SchemaRepository``.

    A miss re-reads the store (the topic is small: one record per schema version) and keeps every version read
    in a cache of at most ``max_entries`` (least recently used dropped first). Reads are at least
    ``min_read_interval_s`` apart (a caller waits for the next one rather than being told "unknown": the
    version may have been registered a moment ago), and a fingerprint the store did not have is answered None
    for ``negative_ttl_s`` without reading again (the payload is then a dead letter, UNKNOWN_WRITER_SCHEMA).
    A store that cannot be read raises ``SchemaStoreError``: a retry for the caller, never a dead letter.
    """

    def __init__(
        self,
        client_config: Mapping[str, Any],
        *,
        topic: str = SCHEMAS_TOPIC,
        timeout: float = 10.0,
        max_entries: int = 1024,
        min_read_interval_s: float = 1.0,
        negative_ttl_s: float = 30.0,
        reader: Callable[[], dict[str, list[SchemaVersion]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._read = reader or (lambda: read_schema_versions(client_config, topic=topic, timeout=timeout))
        self.max_entries = max_entries
        self.min_read_interval_s = min_read_interval_s
        self.negative_ttl_s = negative_ttl_s
        self._clock, self._sleep = clock, sleep
        self._cache: OrderedDict[int, WriterSchema] = OrderedDict()
        self._unknown: OrderedDict[int, float] = OrderedDict()  # fingerprint -> when the store lacked it
        self._last_read: float | None = None
        self._lock = threading.Lock()
        self.reads = 0  # how often the store was read (tests, metrics)

    def __call__(self, fingerprint: int) -> WriterSchema | None:
        with self._lock:
            found = self._cache.get(fingerprint)
            if found is not None:
                self._cache.move_to_end(fingerprint)
                return found
            missed_at = self._unknown.get(fingerprint)
            if missed_at is not None and self._clock() - missed_at < self.negative_ttl_s:
                return None
            if self._last_read is not None:
                wait = self.min_read_interval_s - (self._clock() - self._last_read)
                if wait > 0:
                    self._sleep(wait)
            history = self._read()  # SchemaStoreError propagates: the caller retries, nothing is dead-lettered
            self.reads += 1
            self._last_read = self._clock()
            for versions in history.values():
                for version in versions:
                    self._remember(int(version.fingerprint, 16), WriterSchema(version.subject, version.schema))
            found = self._cache.get(fingerprint)
            if found is None:
                self._unknown[fingerprint] = self._last_read
                self._unknown.move_to_end(fingerprint)
                while len(self._unknown) > self.max_entries:
                    self._unknown.popitem(last=False)
            else:
                self._unknown.pop(fingerprint, None)
                self._cache.move_to_end(fingerprint)
            return found

    def _remember(self, fingerprint: int, writer: WriterSchema) -> None:
        self._cache[fingerprint] = writer
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)


class SchemaStoreSettings(BaseSettings):
    """How a consumer reads the schema store for writer schemas it was not built with (field `x` from `X`)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    schema_store_resolve: bool = Field(
        True, description="Resolve unknown writer fingerprints from the _lp_schemas store (false: files only)."
    )
    schema_store_bootstrap_servers: OptionalBrokerList = Field(
        "", description="Brokers holding _lp_schemas (empty: KAFKA_BOOTSTRAP_SERVERS, the usual case)."
    )
    schema_store_timeout_s: float = Field(10.0, gt=0, description="Longest read of the store before it counts as down.")
    schema_store_max_entries: int = Field(1024, ge=1, description="Writer schemas kept in memory (LRU).")
    schema_store_negative_ttl_s: float = Field(
        30.0, ge=0, description="How long a fingerprint the store lacks is answered 'unknown' without reading again."
    )


def writer_resolver(settings: SchemaStoreSettings) -> StoreWriterResolver | None:
    """The resolver a consumer's `SchemaRepository` asks on a miss, from its settings; None when turned off.
    `settings` is a service's settings that include `SchemaStoreSettings` (the Kafka credentials are the service's)."""
    if not settings.schema_store_resolve:
        return None
    if not isinstance(settings, ServiceSettings):
        raise TypeError("writer_resolver needs a service's settings (ServiceSettings with SchemaStoreSettings)")
    config = client_config(settings, client_id=f"{settings.service_name}-schema-store")
    if settings.schema_store_bootstrap_servers:
        config["bootstrap.servers"] = settings.schema_store_bootstrap_servers
    return StoreWriterResolver(
        config,
        timeout=settings.schema_store_timeout_s,
        max_entries=settings.schema_store_max_entries,
        negative_ttl_s=settings.schema_store_negative_ttl_s,
    )
