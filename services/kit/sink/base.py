"""What a sink implements (`Sink`) and what it answers the runner (`WriteResult`, `Rejection`,
`SinkBackpressure`, `WrittenBatch`), and the route refused records take (`DeadLetterRoute`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Literal, Protocol

from services.kit.kafka import Headers
from services.kit.sink.records import PartitionBatch, SinkRecord, TopicPartition

# "record": the runner decodes every record (refusals go to the dead-letter topic); "header": it only checks the
# single-object header and size (the store decodes the bodies column-wise); "none": it checks nothing and wraps
# records only when one is looked at (the sink decodes and checks everything itself, e.g. raw-bytes topics).
DecodeMode = Literal["record", "header", "none"]


class RejectionStage(StrEnum):
    """Where a sink refused a record (a dead letter's stage)."""

    DECODE = "decode"  # not a record of the topic's contract (the runner's check, or the sink's own decoder)
    STORE = "store"  # the store refused it


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record the sink refused: it goes to the dead-letter route with this reason."""

    record: SinkRecord
    code: str
    message: str
    field: str | None = None
    stage: RejectionStage = RejectionStage.STORE


class OutgoingRecord(Protocol):
    """A record to produce: what a `DeadLetterRoute` returns."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


class DeadLetterRoute(Protocol):
    """Where a refused record goes, and as what: errors are a second output stream, and a dead-letter topic is
    just its route. The kit knows no dead-letter format: the `SinkService` subclass gives the route, the runner
    produces what it returns and awaits the broker's acknowledgement before it commits the batch."""

    def __call__(self, rejection: Rejection, now: datetime) -> OutgoingRecord:
        """The record to produce for `rejection`, refused at `now` (UTC; one time for a whole batch)."""
        ...


@dataclass(slots=True)
class WriteResult:
    written: int = 0  # records the store holds now (rows a replay dedups count too)
    rejected: list[Rejection] = field(default_factory=list)


class SinkBackpressure(Exception):
    """The store is slow or unavailable: the runner pauses the partition and retries the same batch later."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class WrittenBatch:
    """A batch the store holds: its last offset, and the group it was written with (see `Sink.write_group`)."""

    last_offset: int
    group: str | None = None


class Sink(ABC):
    """A store the runner writes partition batches to. Keep `write` idempotent for a given `dedup_token`."""

    name: ClassVar[str] = "sink"
    # The store shows a batch's records once `write` returns (the runner then observes their event-to-visible
    # time). False for a sink that commits later on its own (the archiver: it observes at its snapshot commit).
    visible_on_write: ClassVar[bool] = True
    decode_mode: ClassVar[DecodeMode] = "record"
    # True: the runner hands over the due batches of ALL its partitions at once (`write_group`), for stores
    # where every write costs a lot whatever its size (ClickHouse: a part and its views per insert).
    group_writes: ClassVar[bool] = False

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:  # noqa: B027 (an optional hook)
        """The runner drained these partitions and gave them up (a rebalance): forget what is kept of them."""

    def lost(self, partitions: Sequence[TopicPartition]) -> None:  # noqa: B027 (an optional hook)
        """These partitions were lost without a drain (another member may own them): drop what is kept."""

    @abstractmethod
    def write(self, batch: PartitionBatch) -> WriteResult:
        """Store the batch (all of it, or raise). Return the records the store refused, with reasons.

        Raise `SinkBackpressure` when the store is slow or down (the same batch comes back later); any other
        exception stops the service without committing, so the batch is replayed after the restart.
        """

    def write_group(self, batches: Sequence[PartitionBatch]) -> list[WriteResult]:
        """Store several partition batches together (`group_writes`); one result each, in order.

        All or nothing from the runner's view: after `SinkBackpressure` the SAME group comes back, so a write
        that half succeeded must be idempotent. A replay after a crash hands over the same group again when
        this process owns all of its partitions (`WrittenBatch.group`)."""
        return [self.write(batch) for batch in batches]

    def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int] | None:
        """Next offset to consume per partition, for a sink that keeps offsets with its data (seek there).
        None, or a partition left out: use the Kafka committed offset. May raise `SinkBackpressure`."""
        return None

    def written_batch_ends(
        self, starts: Mapping[TopicPartition, int], topic_ids: Mapping[str, str | None]
    ) -> Mapping[TopicPartition, Sequence[int | WrittenBatch]]:
        """The batches the store already holds at or after each start offset (written to the store, not yet
        committed to Kafka), for the topics' current incarnation (`topic_ids`, as in `PartitionBatch`): their
        last offsets, or `WrittenBatch`es naming the group they were written with. The runner ends replayed
        batches exactly there (and regroups them), so they repeat their `dedup_token`. Default: none known.
        May raise `SinkBackpressure`."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store's resources (after the last write)."""
