"""SinkService's stop: the runner drains, then the subclass's hooks and the store's close, each even after a failure."""

from __future__ import annotations

from datetime import datetime

import pytest

from services.kit.sink import OutgoingRecord, PartitionBatch, Rejection, Sink, SinkService, SinkSettings, WriteResult


class RecordingSink(Sink):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def write(self, batch: PartitionBatch) -> WriteResult:
        raise AssertionError("not written in these tests")

    def close(self) -> None:
        self.calls.append("sink.close")


class RecordingRunner:
    def __init__(self, calls: list[str], error: Exception | None = None) -> None:
        self.calls = calls
        self.error = error

    def close(self, timeout_s: float) -> None:
        self.calls.append(f"runner.close({timeout_s:g})")
        if self.error is not None:
            raise self.error


class HookedService(SinkService[SinkSettings]):
    def __init__(self, settings: SinkSettings) -> None:
        super().__init__(settings)
        self.calls: list[str] = []

    def make_sink(self) -> Sink:
        return RecordingSink(self.calls)

    def subjects(self) -> dict[str, str | None]:
        return {"things": "thing"}

    def dead_letter(self, rejection: Rejection, now: datetime) -> OutgoingRecord:
        raise AssertionError("nothing is refused in these tests")

    def dead_letter_topic(self, topic: str) -> str:
        return f"{topic}.{self.sink.name}.dlq"

    def on_drained(self) -> None:
        self.calls.append("on_drained")

    def after_stop(self) -> None:
        self.calls.append("after_stop")


@pytest.fixture
def service() -> HookedService:
    settings = SinkSettings(kafka_bootstrap_servers="127.0.0.1:1", consumer_group="g", shutdown_timeout_s=20)
    return HookedService(settings)


def test_stop_drains_then_runs_the_hooks_around_closing_the_store(service: HookedService) -> None:
    service.sink = service.make_sink()
    service.runner = RecordingRunner(service.calls)  # type: ignore[assignment]
    service.stop()
    # 3/4 of the shutdown budget for the drain: the rest is for the hooks and the store.
    assert service.calls == ["runner.close(15)", "on_drained", "sink.close", "after_stop"]


def test_a_failed_drain_still_closes_the_store_and_runs_the_hooks(service: HookedService) -> None:
    service.sink = service.make_sink()
    service.runner = RecordingRunner(service.calls, RuntimeError("broker gone"))  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="broker gone"):
        service.stop()
    assert service.calls == ["runner.close(15)", "on_drained", "sink.close", "after_stop"]


def test_without_a_sink_stop_runs_no_hooks(service: HookedService) -> None:
    """start() failed before the store was opened: nothing to report on or close."""
    service.stop()
    assert service.calls == []


def test_the_dead_letter_topics_are_one_per_input_topic(service: HookedService) -> None:
    service.sink = service.make_sink()
    assert service.dead_letter_topics() == ["things.sink.dlq"]
