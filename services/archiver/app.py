"""The archiver service: the kit's sink runner feeding `ArchiverSink`, one Iceberg commit per table.

`ArchiverRunner` adds three things to `services.kit.sink.SinkRunner` (proposed upstream, see docs/archiver.md):
dead-letter topics are consumed raw (their payloads have no contract: any bytes are archived as they are),
the sink hears about revoked and lost partitions (to commit or drop what it buffered of them before the next
owner starts), and a fenced sink can ask for its partitions to be sought to the stored offsets again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, cast, overload

from confluent_kafka import Message
from confluent_kafka import TopicPartition as KafkaTopicPartition

from services.kit.avro import SchemaRepository
from services.kit.kafka import client_config, require_topics
from services.kit.sink import (
    PartitionBatch,
    RunnerConfig,
    SinkRecord,
    SinkRunner,
    SinkService,
    TopicPartition,
    _Pending,
)

from .archive import ArchiverSink
from .catalog import open_catalog
from .schemas import TableSpec, default_tables
from .settings import ArchiverSettings

log = logging.getLogger(__name__)

# Dead-letter topics have no Avro subject; the runner wants one per topic for its header checks, which the
# archiver skips for these topics (`raw_topics`). Any existing subject does.
RAW_PLACEHOLDER_SUBJECT = "raw_event"


class LazyRecords(Sequence[SinkRecord]):
    """The batch's messages, wrapped as `SinkRecord`s only when one is looked at (a rejection, a trace link):
    the archiver reads the messages column-wise and checks every header itself while decoding."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    def __len__(self) -> int:
        return len(self.messages)

    @overload
    def __getitem__(self, index: int) -> SinkRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[SinkRecord]: ...
    def __getitem__(self, index: int | slice) -> SinkRecord | list[SinkRecord]:
        if isinstance(index, slice):
            return [SinkRecord(m) for m in self.messages[index]]
        return SinkRecord(self.messages[index])


class ArchiverRunner(SinkRunner):
    def __init__(self, *args: Any, raw_topics: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_topics = frozenset(raw_topics)

    def _prepare(self, tp: TopicPartition, messages: list[Message], last: int) -> _Pending:
        # No per-record header check here: the columnar decoder checks every header, and a payload it cannot
        # take goes through the kit's AvroDeserializer, whose DecodeError dead-letters it as the runner would.
        # Dead-letter topics are raw bytes: nothing to check.
        records = cast(list[SinkRecord], LazyRecords(messages))
        batch = PartitionBatch(
            tp.topic, tp.partition, records, messages[0].offset(), last, self.topic_ids.get(tp.topic)
        )
        return _Pending(batch, [])

    def _on_revoke(self, consumer: Any, partitions: list[KafkaTopicPartition]) -> None:
        super()._on_revoke(consumer, partitions)
        cast(ArchiverSink, self.sink).revoked([TopicPartition(kp.topic, kp.partition) for kp in partitions])

    def _on_lost(self, consumer: Any, partitions: list[KafkaTopicPartition]) -> None:
        super()._on_lost(consumer, partitions)
        cast(ArchiverSink, self.sink).lost([TopicPartition(kp.topic, kp.partition) for kp in partitions])

    def resync(self, partitions: Sequence[TopicPartition]) -> None:
        """Seek these partitions to the sink's stored offsets again (its buffer of them was dropped).

        Call between steps, never from inside `Sink.write`: the runner is iterating its states there."""
        for tp in partitions:
            state = self.states.get(tp)
            if state is not None:
                state.resolved = False  # the next step asks stored_offsets, seeks there, drops what was fetched
                state.next_resolve_at = 0.0
                state.messages.clear()
                state.group = None  # a batch waiting for a retry was read before the fence: never write it


def table_specs(settings: ArchiverSettings) -> list[TableSpec]:
    specs = default_tables(
        settings.topics_of("user_events"), settings.topics_of("transactions"), settings.topics_of("dead_letters")
    )
    return [spec for spec in specs if spec.name in settings.table_names]


class ArchiverService(SinkService[ArchiverSettings]):
    """`python -m services.archiver run`."""

    runner: ArchiverRunner
    sink: ArchiverSink

    def __init__(self, settings: ArchiverSettings) -> None:
        super().__init__(settings)
        self.specs = table_specs(settings)
        self.repository = SchemaRepository.load()
        self.committer_id = f"{settings.service_name}-{uuid.uuid4().hex[:12]}"
        self._resync: list[TopicPartition] = []

    def subjects(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for spec in self.specs:
            for topic in spec.topics:
                out[topic] = spec.subject or RAW_PLACEHOLDER_SUBJECT
        return out

    def raw_topics(self) -> list[str]:
        return [topic for spec in self.specs if spec.subject is None for topic in spec.topics]

    def make_sink(self) -> ArchiverSink:
        catalog = open_catalog(self.settings)
        return ArchiverSink(
            catalog,
            self.settings,
            self.specs,
            self.repository,
            committer_id=self.committer_id,
            on_fenced=self._on_fenced,
        )

    def _on_fenced(self, partitions: list[TopicPartition]) -> None:
        self._resync.extend(partitions)  # applied after the runner's step (we are inside its write here)

    def start(self) -> None:
        settings = self.settings
        # pyiceberg logs every FileIO it loads at INFO; its problems surface as our own errors.
        logging.getLogger("pyiceberg").setLevel(max(logging.WARNING, logging.getLogger().level))
        kafka = client_config(settings)
        subjects = self.subjects()
        raw = set(self.raw_topics())
        self.sink = self.make_sink()
        require_topics(kafka, *subjects, *(self.dead_letter_topic(t) for t in subjects if t not in raw))
        self.runner = ArchiverRunner(
            self.sink,
            kafka,
            settings.consumer_group,
            subjects,
            self.dead_letter_topic,
            RunnerConfig.from_settings(settings),
            schemas=self.repository,
            raw_topics=sorted(raw),
        )
        self.sink.set_topic_ids(self.runner.topic_ids)
        self.health.add_check("store", self.runner.readiness)
        self.health.add_check("archive", self.sink.readiness)
        self.log.info(
            "archiving %s",
            ", ".join(f"{spec.name} <- {','.join(spec.topics)}" for spec in self.specs),
            extra={"consumer_group": settings.consumer_group, "catalog": settings.iceberg_catalog},
        )

    def step(self) -> bool:
        self.runner.step()
        self.sink.commit_due()
        if self._resync:
            partitions, self._resync = self._resync, []
            self.runner.resync(partitions)
        return True

    def stop(self) -> None:
        try:
            super().stop()  # drains the runner into the buffers; leaving the group and sink.close() commit them
        finally:
            sink = getattr(self, "sink", None)
            if sink is not None:
                report = {
                    name: {"rows": e.committer.rows_committed, "snapshots": e.committer.snapshots_committed}
                    for name, e in sink.tables.items()
                }
                self.log.info("archived by this process: %s", report, extra={"archived": report})
