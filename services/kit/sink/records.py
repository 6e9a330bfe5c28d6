"""Records and batches as a sink sees them: `SinkRecord` (decoded on first use), `PartitionBatch` (one
topic-partition's consumed range), `LazyRecords` (wrapped only when looked at), and the payload header checks."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast, overload

from confluent_kafka import Message

from services.kit.avro import AvroDeserializer, Decoded, DecodeError
from services.kit.kafka import Headers


class TopicPartition(NamedTuple):
    """A partition of a topic (hashable; unlike confluent_kafka.TopicPartition it carries no offset)."""

    topic: str
    partition: int


class UndecodableRecord(ValueError):
    def __init__(self, error: DecodeError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class SinkRecord:
    """One consumed record. Fields are read from the Kafka message on first use (most are never needed).

    `value` is the decoded Avro record (dict). With `Sink.decode_mode = "record"` (the default) the runner has
    decoded every record before `write`, so `value` never fails there; a `"header"` sink decodes payloads its
    own way (columnar) and may call `decode()` for the odd record its decoder refuses.
    """

    __slots__ = ("_decoded", "_decoder", "message")

    def __init__(self, message: Message, decoder: AvroDeserializer | None = None) -> None:
        self.message = message
        self._decoder = decoder
        self._decoded: Decoded | DecodeError | None = None

    @classmethod
    def of(
        cls,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        decoder: AvroDeserializer | None = None,
    ) -> SinkRecord:
        """A record not read from Kafka (tests, tools)."""
        message = Message(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            headers=headers,
            timestamp=(1, timestamp_ms) if timestamp_ms is not None else (0, 0),
        )
        return cls(message, decoder)

    @property
    def topic(self) -> str:
        return cast(str, self.message.topic())

    @property
    def partition(self) -> int:
        return cast(int, self.message.partition())

    @property
    def offset(self) -> int:
        return cast(int, self.message.offset())

    @property
    def key(self) -> bytes | None:
        return cast("bytes | None", self.message.key())

    @property
    def raw(self) -> bytes | None:
        """The value bytes exactly as consumed (what a dead letter carries)."""
        return cast("bytes | None", self.message.value())

    @property
    def headers(self) -> list[tuple[str, bytes | None]]:
        return list(self.message.headers() or ())

    @property
    def timestamp_ms(self) -> int | None:
        kind, value = self.message.timestamp()
        return value if kind else None

    def decode(self) -> Decoded | DecodeError:
        if self._decoded is None:
            if self._decoder is None:
                raise RuntimeError("this record has no Avro decoder")
            self._decoded = self._decoder(self.raw)
        return self._decoded

    @property
    def value(self) -> dict[str, Any]:
        result = self.decode()
        if isinstance(result, DecodeError):
            raise UndecodableRecord(result)
        return result.record

    def __repr__(self) -> str:
        return f"SinkRecord({self.topic}:{self.partition}@{self.offset})"


@dataclass(slots=True)
class PartitionBatch:
    """Records of ONE topic-partition, in offset order, covering the consumed range first..last_offset.

    The range includes records the runner already dead-lettered (undecodable): it is what was consumed, so
    the same range consumed again yields the same `dedup_token`.
    """

    topic: str
    partition: int
    records: list[SinkRecord]
    first_offset: int
    last_offset: int
    topic_id: str | None = None  # the topic's Kafka id: tells a re-created topic (offsets from 0 again) apart

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def dedup_token(self) -> str:
        """`<topic>[@<topic id>]:<partition>:<first>-<last offset>`: the same consumed range, the same token."""
        topic = f"{self.topic}@{self.topic_id}" if self.topic_id else self.topic
        return f"{topic}:{self.partition}:{self.first_offset}-{self.last_offset}"

    def __len__(self) -> int:
        return len(self.records)


class LazyRecords(Sequence[SinkRecord]):
    """A batch's messages, wrapped as `SinkRecord`s only when one is looked at (a rejection, a trace link): for
    sinks that read the messages column-wise (`decode_mode = "none"`)."""

    def __init__(self, messages: list[Message], decoder: AvroDeserializer | None = None) -> None:
        self.messages = messages
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.messages)

    @overload
    def __getitem__(self, index: int) -> SinkRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[SinkRecord]: ...
    def __getitem__(self, index: int | slice) -> SinkRecord | list[SinkRecord]:
        if isinstance(index, slice):
            return [SinkRecord(m, self.decoder) for m in self.messages[index]]
        return SinkRecord(self.messages[index], self.decoder)


def messages_of(records: Sequence[SinkRecord]) -> list[Message]:
    """The Kafka messages behind `records`, without wrapping a `LazyRecords` batch record by record."""
    if isinstance(records, LazyRecords):
        return records.messages
    return [record.message for record in records]


# --- payload checks -------------------------------------------------------------------------------------------
def check_header(deserializer: AvroDeserializer, payload: bytes | None) -> DecodeError | None:
    """The header checks of `AvroDeserializer` only: a "header" sink decodes the body itself (and reports a
    corrupt body with `DecodeErrorCode.CORRUPT`)."""
    writer = deserializer.writer_of(payload)
    return writer if isinstance(writer, DecodeError) else None


def fingerprint_bytes(deserializer: AvroDeserializer) -> bytes:
    """Bytes 2..10 of a payload written with the reader's (current) schema."""
    return struct.pack("<Q", deserializer.reader.fingerprint)
