"""`SinkService`: a sink as a service (`make_sink()`, `subjects()` and `dead_letter()` are all a subclass must
give)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from typing import cast

from services.kit.avro import SchemaRepository, WriterResolver
from services.kit.kafka import client_config, require_topics
from services.kit.service import Service, SettingsT
from services.kit.sink.base import OutgoingRecord, Rejection, Sink
from services.kit.sink.runner import SinkRunner
from services.kit.sink.settings import RunnerConfig, SinkSettings


class SinkService(Service[SettingsT], ABC):
    """A sink as a service: `make_sink()`, `subjects()` and `dead_letter()` are all a subclass must give.

    Settings must be (a subclass of) `SinkSettings`. `stop()` flushes and commits within SHUTDOWN_TIMEOUT_S.
    A subclass adds to `start` and `stop` through the hooks `before_start`, `after_start`, `on_drained` and
    `after_stop`, not by overriding them."""

    runner: SinkRunner
    sink: Sink
    schemas: SchemaRepository  # the Avro contracts, loaded at start (the runner decodes with them)

    @abstractmethod
    def make_sink(self) -> Sink:
        """Connect to the store (apply migrations, ...); raise to fail start-up."""

    @abstractmethod
    def subjects(self) -> dict[str, str | None]:
        """Input topic -> Avro subject of its values (None: raw bytes without a contract)."""

    @abstractmethod
    def dead_letter(self, rejection: Rejection, now: datetime) -> OutgoingRecord:
        """The sink's `DeadLetterRoute`: the record to produce for a refused one, to `dead_letter_topic` of its
        topic (the dead-letter format and topic names are the contracts', which the kit does not import)."""

    @abstractmethod
    def dead_letter_topic(self, topic: str) -> str:
        """Where refused records of `topic` go."""

    def writer_resolver(self) -> WriterResolver | None:
        """Where writer schemas the contract files lack are looked up (a producer already on a newer version):
        the service passes the schema store's resolver (the contracts', which the kit does not import). None:
        such records are dead letters (UNKNOWN_WRITER_SCHEMA). A store that cannot be read stalls the batch, with
        backoff, and marks `schema-store` down in /readyz; it never dead-letters."""
        return None

    def dead_letter_topics(self) -> list[str]:
        """The dead-letter topics that must exist at start (default: that of every input topic)."""
        return [self.dead_letter_topic(topic) for topic in self.subjects()]

    # --- hooks around start and stop (all optional) ----------------------------------------------------------
    def before_start(self) -> None:
        """First thing in `start`, before the store is opened (process-wide settings)."""

    def after_start(self) -> None:
        """The sink and the runner are made, nothing is consumed yet: more health checks, servers, logs."""

    def on_drained(self) -> None:
        """In `stop`, the runner flushed, committed and left the group; the store is still open (a final report
        that reads it, servers to stop). Runs even when draining failed, only if the sink was made."""

    def after_stop(self) -> None:
        """Last thing in `stop`, the store closed. Runs even when an earlier step failed, only if the sink was made."""

    # --- the frame ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        settings = cast(SinkSettings, self.settings)
        self.before_start()
        kafka = client_config(settings)
        subjects = self.subjects()
        self.schemas = SchemaRepository.load(resolver=self.writer_resolver())
        self.sink = self.make_sink()
        require_topics(kafka, *subjects, *self.dead_letter_topics(), timeout=settings.dependency_wait_s)
        self.runner = SinkRunner(
            self.sink,
            kafka,
            settings.consumer_group,
            subjects,
            self.dead_letter,
            RunnerConfig.from_settings(settings),
            schemas=self.schemas,
            health=self.health,
        )
        self.health.add_check("store", self.runner.readiness)
        self.log.info(
            "sinking %s into %s",
            ", ".join(subjects),
            self.sink.name,
            extra={"consumer_group": settings.consumer_group, "batch_max_rows": settings.batch_max_rows},
        )
        self.after_start()

    def step(self) -> bool:
        self.runner.step()
        return True

    def stop(self) -> None:
        runner = getattr(self, "runner", None)
        sink = getattr(self, "sink", None)
        try:
            try:
                if runner is not None:
                    # Leave a margin of the shutdown budget for closing the store and the report.
                    runner.close(timeout_s=max(1.0, self.settings.shutdown_timeout_s * 0.75))
            finally:
                if sink is not None:
                    try:
                        self.on_drained()
                    finally:
                        sink.close()
        finally:
            if sink is not None:
                self.after_stop()
