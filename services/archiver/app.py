"""The archiver service: the kit's sink runner feeding `ArchiverSink`, one Iceberg commit per table.

The sink decodes every record itself, column-wise (`decode_mode = "none"`); dead-letter topics are consumed
raw (subject None: their payloads have no contract, any bytes are archived as they are). The sink hears about
revoked and lost partitions through the kit's hooks (to commit or drop what it buffered of them before the next
owner starts), and a fenced sink has its partitions sought to the stored offsets again (`SinkRunner.resync`).
"""

from __future__ import annotations

import logging
import uuid

from services.contracts.sinks import ContractSinkService
from services.kit.memory import use_system_arrow_pool
from services.kit.sink import TopicPartition
from services.stores.iceberg import open_catalog, wait_for_storage

from .archive import ArchiverSink
from .schemas import TableSpec, default_tables
from .settings import ArchiverSettings

log = logging.getLogger(__name__)


def table_specs(settings: ArchiverSettings) -> list[TableSpec]:
    specs = default_tables(
        settings.topics_of("user_events"), settings.topics_of("transactions"), settings.topics_of("dead_letters")
    )
    return [spec for spec in specs if spec.name in settings.table_names]


class ArchiverService(ContractSinkService[ArchiverSettings]):
    """`python -m services.archiver run`."""

    sink: ArchiverSink

    def __init__(self, settings: ArchiverSettings) -> None:
        super().__init__(settings)
        self.specs = table_specs(settings)
        self.committer_id = f"{settings.service_name}-{uuid.uuid4().hex[:12]}"
        self._resync: list[TopicPartition] = []

    def subjects(self) -> dict[str, str | None]:
        return {topic: spec.subject for spec in self.specs for topic in spec.topics}

    def raw_topics(self) -> list[str]:
        return [topic for spec in self.specs if spec.subject is None for topic in spec.topics]

    def make_sink(self) -> ArchiverSink:
        wait_for_storage(self.settings, self.settings.dependency_wait_s)
        catalog = open_catalog(self.settings)
        return ArchiverSink(
            catalog,
            self.settings,
            self.specs,
            self.schemas,
            committer_id=self.committer_id,
            on_fenced=self._on_fenced,
        )

    def _on_fenced(self, partitions: list[TopicPartition]) -> None:
        self._resync.extend(partitions)  # applied after the runner's step (we are inside its write here)

    def dead_letter_topics(self) -> list[str]:
        raw = set(self.raw_topics())  # dead-letter topics are archived, never dead-lettered again
        return [self.dead_letter_topic(topic) for topic in self.subjects() if topic not in raw]

    def before_start(self) -> None:
        self.arrow_pool = use_system_arrow_pool()
        # pyiceberg logs every FileIO it loads at INFO; its problems surface as our own errors.
        logging.getLogger("pyiceberg").setLevel(max(logging.WARNING, logging.getLogger().level))

    def after_start(self) -> None:
        self.sink.set_topic_ids(self.runner.topic_ids)
        self.health.add_check("archive", self.sink.readiness)
        self.log.info(
            "archiving %s",
            ", ".join(f"{spec.name} <- {','.join(spec.topics)}" for spec in self.specs),
            extra={
                "consumer_group": self.settings.consumer_group,
                "catalog": self.settings.iceberg_catalog,
                "arrow_memory_pool": self.arrow_pool,
            },
        )

    def step(self) -> bool:
        self.runner.step()
        self.sink.commit_due()
        if self._resync:
            partitions, self._resync = self._resync, []
            self.runner.resync(partitions)
        return True

    def after_stop(self) -> None:
        """Leaving the group and `sink.close()` committed what the runner drained into the sink's buffers."""
        report = {
            name: {"rows": e.committer.rows_committed, "snapshots": e.committer.snapshots_committed}
            for name, e in self.sink.tables.items()
        }
        self.log.info("archived by this process: %s", report, extra={"archived": report})
