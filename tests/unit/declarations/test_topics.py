"""reconcile_topics against a fake AdminClient: the paths Tansu cannot exercise (config deletes, partition
growth that works, replication checks) and the error handling."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AlterConfigOpType, ConfigSource

from services.declarations.resources import TopicSpec
from services.declarations.topics import reconcile_topics


def done(result: Any = None, error: KafkaError | None = None) -> Future[Any]:
    future: Future[Any] = Future()
    if error is not None:
        future.set_exception(KafkaException(error))
    else:
        future.set_result(result)
    return future


def entry(value: str, source: ConfigSource = ConfigSource.DYNAMIC_TOPIC_CONFIG, sensitive: bool = False) -> Any:
    return SimpleNamespace(value=value, source=source.value, is_sensitive=sensitive)


@dataclass
class FakeAdmin:
    brokers: int = 3
    topics: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (partitions, replicas)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_partitions_error: KafkaError | None = None
    alter_error: KafkaError | None = None
    create_error: KafkaError | None = None
    created: list[Any] = field(default_factory=list)
    altered: list[Any] = field(default_factory=list)
    unreachable: bool = False
    created_by_someone_else: bool = False  # the create loses a race: the topic exists right after

    def list_topics(self, timeout: float) -> Any:
        if self.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        topics = {
            name: SimpleNamespace(
                error=None, partitions={i: SimpleNamespace(replicas=list(range(rf))) for i in range(count)}
            )
            for name, (count, rf) in self.topics.items()
        }
        return SimpleNamespace(brokers={i: object() for i in range(self.brokers)}, topics=topics)

    def create_topics(self, new_topics: list[Any], **_: Any) -> dict[str, Future[Any]]:
        futures = {}
        for topic in new_topics:
            self.created.append(topic)
            futures[topic.topic] = done(error=self.create_error)
            if self.create_error is None or self.created_by_someone_else:
                self.topics[topic.topic] = (topic.num_partitions, topic.replication_factor)
        return futures

    def create_partitions(self, new_partitions: list[Any], **_: Any) -> dict[str, Future[Any]]:
        (request,) = new_partitions
        if self.create_partitions_error is None:
            self.topics[request.topic] = (request.new_total_count, self.topics[request.topic][1])
        return {request.topic: done(error=self.create_partitions_error)}

    def describe_configs(self, resources: list[Any], **_: Any) -> dict[Any, Future[Any]]:
        return {resource: done(self.configs.get(resource.name, {})) for resource in resources}

    def incremental_alter_configs(self, resources: list[Any], **_: Any) -> dict[Any, Future[Any]]:
        (resource,) = resources
        self.altered += resource.incremental_configs
        return {resource: done(error=self.alter_error)}


def spec(partitions: int = 4, rf: int = 3, config: dict[str, str] | None = None) -> TopicSpec:
    return TopicSpec(name="t", topic_name="t.v1", partitions=partitions, replication_factor=rf, config=config or {})


def test_missing_topic_is_created_with_its_settings() -> None:
    admin = FakeAdmin()
    (result,) = reconcile_topics(admin, [spec(config={"retention.ms": "1000"})])
    assert (result.action, result.message, result.partitions) == ("created", "4 partitions, replication 3", 4)
    (created,) = admin.created
    assert (created.num_partitions, created.replication_factor) == (4, 3)
    assert created.config == {"retention.ms": "1000"}


def test_replication_factor_can_be_capped_for_single_broker_clusters() -> None:
    admin = FakeAdmin(brokers=1)
    (result,) = reconcile_topics(admin, [spec()], cap_replication_factor=True)
    assert result.action == "created" and "capped from 3" in result.message
    assert admin.created[0].replication_factor == 1
    (again,) = reconcile_topics(admin, [spec()], cap_replication_factor=True)
    assert again.action == "unchanged"


def test_existing_topic_in_sync_is_unchanged() -> None:
    admin = FakeAdmin(topics={"t.v1": (4, 3)}, configs={"t.v1": {"retention.ms": entry("1000")}})
    (result,) = reconcile_topics(admin, [spec(config={"retention.ms": "1000"})])
    assert result.action == "unchanged" and not admin.altered


def test_configs_are_set_and_undeclared_topic_configs_reset() -> None:
    admin = FakeAdmin(
        topics={"t.v1": (4, 3)},
        configs={
            "t.v1": {
                "retention.ms": entry("1000"),
                "segment.ms": entry("60000"),  # set on the topic, no longer declared: reset
                "max.message.bytes": entry("1048588", ConfigSource.DEFAULT_CONFIG),  # broker default: left alone
                "sasl.secret": entry("", sensitive=True),
            }
        },
    )
    declared = {"retention.ms": "2000", "compression.type": "zstd", "sasl.secret": "x"}
    (result,) = reconcile_topics(admin, [spec(config=declared)])
    assert result.action == "updated"
    assert "retention.ms: 1000 -> 2000" in result.message
    assert "compression.type: unset -> zstd" in result.message
    assert "segment.ms: 60000 -> broker default" in result.message
    operations = {(e.name, e.incremental_operation) for e in admin.altered}
    assert operations == {
        ("compression.type", AlterConfigOpType.SET),
        ("retention.ms", AlterConfigOpType.SET),
        ("segment.ms", AlterConfigOpType.DELETE),
    }


def test_failed_config_update_is_an_error_naming_the_changes() -> None:
    admin = FakeAdmin(topics={"t.v1": (4, 3)}, alter_error=KafkaError(KafkaError.POLICY_VIOLATION, "nope"))
    (result,) = reconcile_topics(admin, [spec(config={"retention.ms": "5"})])
    assert result.action == "error"
    assert "config update failed (retention.ms: unset -> 5)" in result.message and "nope" in result.message


def test_partitions_grow_when_the_broker_supports_it() -> None:
    admin = FakeAdmin(topics={"t.v1": (4, 3)})
    (result,) = reconcile_topics(admin, [spec(partitions=8)])
    assert (result.action, result.message, result.partitions) == ("updated", "partitions 4 -> 8", 8)


def test_partition_growth_on_a_broker_without_create_partitions_is_an_error() -> None:
    admin = FakeAdmin(
        topics={"t.v1": (4, 3)},
        create_partitions_error=KafkaError(KafkaError._UNSUPPORTED_FEATURE, "CreatePartitions not supported"),
    )
    (result,) = reconcile_topics(admin, [spec(partitions=8, config={"retention.ms": "1"})])
    assert result.action == "error" and result.partitions == 4
    assert "cannot increase partitions from 4 to 8: the broker does not support CreatePartitions" in result.message
    assert "retention.ms: unset -> 1" in result.message  # the config change still happened and is reported


def test_partition_decrease_is_refused() -> None:
    admin = FakeAdmin(topics={"t.v1": (4, 3)})
    (result,) = reconcile_topics(admin, [spec(partitions=2)])
    assert result.action == "error" and "cannot decrease partitions from 4 to 2" in result.message


def test_replication_factor_drift_is_an_error() -> None:
    admin = FakeAdmin(topics={"t.v1": (4, 1)})
    (result,) = reconcile_topics(admin, [spec(rf=3)])
    assert result.action == "error" and "replication factor is 1, declared 3" in result.message


def test_topic_created_meanwhile_is_reconciled_as_existing() -> None:
    admin = FakeAdmin(create_error=KafkaError(KafkaError.TOPIC_ALREADY_EXISTS), created_by_someone_else=True)
    (result,) = reconcile_topics(admin, [spec()])
    assert result.action == "unchanged"


def test_other_create_errors_are_reported() -> None:
    admin = FakeAdmin(create_error=KafkaError(KafkaError.INVALID_REPLICATION_FACTOR, "only 1 broker"))
    (result,) = reconcile_topics(admin, [spec()])
    assert result.action == "error" and "create failed: only 1 broker" in result.message


def test_unreachable_cluster_fails_every_topic() -> None:
    results = reconcile_topics(FakeAdmin(unreachable=True), [spec(), TopicSpec("u", "u", 1, 1)])
    assert [r.action for r in results] == ["error", "error"]
    assert all("cannot read cluster metadata" in r.message for r in results)
