"""`SinkService`: a sink as a service (`make_sink()`, `subjects()` and `dead_letter()` are all a subclass must
give)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from typing import cast

from services.kit.kafka import client_config, require_topics
from services.kit.service import Service, SettingsT
from services.kit.sink.base import OutgoingRecord, Rejection, Sink
from services.kit.sink.runner import SinkRunner
from services.kit.sink.settings import RunnerConfig, SinkSettings


class SinkService(Service[SettingsT], ABC):
    """A sink as a service: `make_sink()`, `subjects()` and `dead_letter()` are all a subclass must give.

    Settings must be (a subclass of) `SinkSettings`. `stop()` flushes and commits within SHUTDOWN_TIMEOUT_S."""

    runner: SinkRunner
    sink: Sink

    @abstractmethod
    def make_sink(self) -> Sink:
        """Connect to the store (apply migrations, ...); raise to fail start-up."""

    @abstractmethod
    def subjects(self) -> dict[str, str | None]:
        """Input topic -> Avro subject of its values (None: raw bytes without a contract)."""

    @abstractmethod
    def dead_letter(self, rejection: Rejection, now: datetime) -> OutgoingRecord:
        """The sink's `DeadLetterRoute`: the record to produce for a refused one, to `dead_letter_topic` of its
        topic (the dead-letter format is the contracts', which the kit does not import)."""

    def dead_letter_topic(self, topic: str) -> str:
        """Where refused records of `topic` go (default `<topic>.<sink name>.dlq`)."""
        return f"{topic}.{self.sink.name}.dlq"

    def start(self) -> None:
        settings = cast(SinkSettings, self.settings)
        kafka = client_config(settings)
        subjects = self.subjects()
        self.sink = self.make_sink()
        require_topics(kafka, *subjects, *(self.dead_letter_topic(t) for t in subjects))
        self.runner = SinkRunner(
            self.sink,
            kafka,
            settings.consumer_group,
            subjects,
            self.dead_letter,
            RunnerConfig.from_settings(settings),
        )
        self.health.add_check("store", self.runner.readiness)
        self.log.info(
            "sinking %s into %s",
            ", ".join(subjects),
            self.sink.name,
            extra={"consumer_group": settings.consumer_group, "batch_max_rows": settings.batch_max_rows},
        )

    def step(self) -> bool:
        self.runner.step()
        return True

    def stop(self) -> None:
        runner = getattr(self, "runner", None)
        try:
            if runner is not None:
                # Leave a margin of the shutdown budget for closing the store and the report.
                runner.close(timeout_s=max(1.0, self.settings.shutdown_timeout_s * 0.75))
        finally:
            sink = getattr(self, "sink", None)
            if sink is not None:
                sink.close()
