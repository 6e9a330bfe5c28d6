"""Reconcile declared KafkaTopics with a Kafka cluster through confluent-kafka's AdminClient.

Idempotent: missing topics are created with their partitions, replication factor and configs; existing
ones get their declared configs set. Configs set on the topic but not declared are reset to the broker
default when the declaration is authoritative (local apply); the operator passes ``owned_configs`` instead,
so only keys it applied before and no longer declares are reset, and keys other tools set stay theirs.
Partitions can only grow: an increase goes through CreatePartitions (which some brokers, e.g. Tansu, do not
support: that is reported as an error, never ignored); a decrease, or a replication-factor change, is
refused (``TopicResult.unsupported``) because Kafka cannot do it in place.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from services.declarations.resources import TopicSpec

Action = Literal["created", "updated", "unchanged", "error"]


@dataclass(frozen=True)
class TopicResult:
    topic: str
    action: Action
    message: str = ""
    partitions: int | None = None  # what the topic has after reconciling, when known
    # Declared changes Kafka cannot make (partition decrease, replication-factor change): the spec must change,
    # retrying cannot help. Also part of ``message``; the other errors are the broker's (retry).
    unsupported: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()  # what was changed, one entry per partition count or config key

    @property
    def ok(self) -> bool:
        return self.action != "error"


@dataclass
class _Outcome:
    """What happened to one existing topic, gathered step by step."""

    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)

    def result(self, topic: str, partitions: int | None) -> TopicResult:
        problems = self.unsupported + self.errors
        if problems:
            return TopicResult(
                topic,
                "error",
                "; ".join(problems + self.changes),
                partitions,
                unsupported=tuple(self.unsupported),
                changes=tuple(self.changes),
            )
        action: Action = "updated" if self.changes else "unchanged"
        return TopicResult(topic, action, "; ".join(self.changes), partitions, changes=tuple(self.changes))


def reconcile_topics(
    admin: AdminClient,
    topics: Sequence[TopicSpec],
    *,
    timeout: float = 30.0,
    cap_replication_factor: bool = False,
    owned_configs: Mapping[str, Collection[str]] | None = None,
) -> list[TopicResult]:
    """Bring every topic in ``topics`` to its declared state; one result per topic, in order.

    ``cap_replication_factor`` lowers the replication factor to the number of live brokers (for
    single-broker dev clusters, where the production factor of 3 cannot be met); off in production,
    where a missing broker must not silently reduce durability. ``owned_configs`` (topic name -> keys)
    limits the reset of undeclared configs to those keys; None resets every undeclared topic-level config.
    """
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as error:
        return [TopicResult(spec.topic_name, "error", f"cannot read cluster metadata: {error}") for spec in topics]
    broker_count = len(metadata.brokers)
    wanted_rf = {
        spec.topic_name: min(spec.replication_factor, broker_count)
        if cap_replication_factor and broker_count
        else spec.replication_factor
        for spec in topics
    }

    results: dict[str, TopicResult] = {}
    missing = [spec for spec in topics if spec.topic_name not in metadata.topics]
    if missing:
        new_topics = [
            NewTopic(
                spec.topic_name,
                num_partitions=spec.partitions,
                replication_factor=wanted_rf[spec.topic_name],
                config=dict(spec.config),
            )
            for spec in missing
        ]
        futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
        for spec in missing:
            error = _future_error(futures[spec.topic_name], timeout)
            if error is None:
                rf_note = _rf_note(spec, wanted_rf[spec.topic_name])
                plural = "" if spec.partitions == 1 else "s"
                message = f"{spec.partitions} partition{plural}, replication {wanted_rf[spec.topic_name]}{rf_note}"
                results[spec.topic_name] = TopicResult(spec.topic_name, "created", message, spec.partitions)
            elif not _is_code(error, KafkaError.TOPIC_ALREADY_EXISTS):  # else: created meanwhile, reconcile below
                results[spec.topic_name] = TopicResult(spec.topic_name, "error", f"create failed: {_text(error)}")
        metadata = admin.list_topics(timeout=timeout)

    existing = [spec for spec in topics if spec.topic_name not in results]
    configs = _describe_configs(admin, [spec.topic_name for spec in existing], timeout)
    for spec in existing:
        topic_metadata = metadata.topics.get(spec.topic_name)
        if topic_metadata is None or topic_metadata.error is not None:
            reason = topic_metadata.error if topic_metadata is not None else "not in metadata"
            results[spec.topic_name] = TopicResult(spec.topic_name, "error", f"cannot read the topic: {reason}")
            continue
        outcome = _Outcome()
        partitions = _reconcile_partitions(admin, spec, len(topic_metadata.partitions), outcome, timeout)
        _check_replication(spec, topic_metadata, wanted_rf[spec.topic_name], outcome)
        owned = None if owned_configs is None else owned_configs.get(spec.topic_name, ())
        _reconcile_configs(admin, spec, configs.get(spec.topic_name), outcome, timeout, owned)
        results[spec.topic_name] = outcome.result(spec.topic_name, partitions)
    return [results[spec.topic_name] for spec in topics]


def _reconcile_partitions(admin: AdminClient, spec: TopicSpec, actual: int, outcome: _Outcome, timeout: float) -> int:
    if spec.partitions == actual:
        return actual
    if spec.partitions < actual:
        outcome.unsupported.append(
            f"cannot decrease partitions from {actual} to {spec.partitions}: Kafka does not support it "
            "(declare a new topic and migrate, or restore the count)"
        )
        return actual
    futures = admin.create_partitions(
        [NewPartitions(spec.topic_name, spec.partitions)], operation_timeout=timeout, request_timeout=timeout
    )
    error = _future_error(futures[spec.topic_name], timeout)
    if error is None:
        outcome.changes.append(f"partitions {actual} -> {spec.partitions}")
        return spec.partitions
    if _is_code(error, KafkaError._UNSUPPORTED_FEATURE) or _is_code(error, KafkaError.UNSUPPORTED_VERSION):
        outcome.errors.append(
            f"cannot increase partitions from {actual} to {spec.partitions}: "
            f"the broker does not support CreatePartitions ({_text(error)})"
        )
    else:
        outcome.errors.append(f"cannot increase partitions from {actual} to {spec.partitions}: {_text(error)}")
    return actual


def _check_replication(spec: TopicSpec, topic_metadata: Any, wanted: int, outcome: _Outcome) -> None:
    replica_counts = {len(partition.replicas) for partition in topic_metadata.partitions.values()}
    # When capped, anything between the cap and the declared factor is as good as it gets.
    acceptable = range(wanted, spec.replication_factor + 1)
    if all(count in acceptable for count in replica_counts):
        return
    outcome.unsupported.append(
        f"replication factor is {max(replica_counts)}, declared {wanted}: changing it needs a partition "
        "reassignment, which is not automated"
    )


def _reconcile_configs(
    admin: AdminClient,
    spec: TopicSpec,
    current: dict[str, ConfigEntry] | None,
    outcome: _Outcome,
    timeout: float,
    owned: Collection[str] | None = None,
) -> None:
    if current is None:
        outcome.errors.append("cannot describe the topic's configs")
        return
    entries: list[ConfigEntry] = []
    for key, value in sorted(spec.config.items()):
        entry = current.get(key)
        if entry is not None and entry.is_sensitive:
            continue  # the broker never shows the value, so it cannot be compared
        if entry is None or entry.value != value:
            old = entry.value if entry is not None else "unset"
            outcome.changes.append(f"{key}: {old} -> {value}")
            entries.append(ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET))
    for key, entry in sorted(current.items()):
        # Only configs set on this topic; broker defaults and broker-wide settings are not ours to reset.
        if key in spec.config or entry.source != ConfigSource.DYNAMIC_TOPIC_CONFIG.value:
            continue
        if owned is None or key in owned:
            outcome.changes.append(f"{key}: {entry.value} -> broker default (no longer declared)")
            entries.append(ConfigEntry(key, None, incremental_operation=AlterConfigOpType.DELETE))
    if not entries:
        return
    resource = ConfigResource(ResourceType.TOPIC, spec.topic_name, incremental_configs=entries)
    futures = admin.incremental_alter_configs([resource], request_timeout=timeout)
    error = _future_error(next(iter(futures.values())), timeout)
    if error is not None:
        outcome.errors.append(f"config update failed ({', '.join(outcome.changes)}): {_text(error)}")
        outcome.changes.clear()


def _describe_configs(admin: AdminClient, topic_names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    if not topic_names:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topic_names]
    futures = admin.describe_configs(resources, request_timeout=timeout)
    configs: dict[str, dict[str, Any]] = {}
    for resource, future in futures.items():
        try:
            configs[resource.name] = future.result(timeout=timeout)
        except (KafkaException, TimeoutError):
            continue  # reported per topic as "cannot describe"
    return configs


def _rf_note(spec: TopicSpec, wanted: int) -> str:
    if wanted == spec.replication_factor:
        return ""
    return f" (capped from {spec.replication_factor}: too few brokers)"


def _future_error(future: Future[Any], timeout: float) -> KafkaError | Exception | None:
    try:
        future.result(timeout=timeout)
    except KafkaException as exception:
        return exception.args[0] if exception.args and isinstance(exception.args[0], KafkaError) else exception
    except Exception as exception:  # timeouts and client-side failures are reported like broker errors
        return exception
    return None


def _is_code(error: KafkaError | Exception, code: int) -> bool:
    return isinstance(error, KafkaError) and error.code() == code


def _text(error: KafkaError | Exception) -> str:
    return error.str() if isinstance(error, KafkaError) else str(error) or type(error).__name__
