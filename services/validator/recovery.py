"""Exactly once at the source: the runtime never produces an output twice, even after a `kill -9`.

The runtime commits an input offset only after every output of it is acknowledged, so after a crash it reads
again the records after its last commit, some of whose outputs are already in the output topics. Kafka
transactions would hide those; the local broker's are unreliable, so instead:

1. **Stamp.** Every output carries `lp-source` = `<input topic>:<partition>:<offset>:<index>/<count>`
   (`services.contracts.headers.SOURCE`): which input it came from, and which of that input's outputs it is.
2. **Floors.** A floor of an output partition X, for an input partition P, is a position in X below which no
   output of P's uncommitted records can lie. The runtime keeps, per output partition, the end of the outputs
   acknowledged for batches already delivered (outputs of one producer land in a partition in the order they
   are sent: aiokafka keeps one request in flight per broker), starting from X's end when the worker started.
   After each successful input commit it stores that snapshot, taken together with the committed offsets, as
   the committed offsets of a consumer group of its own per input partition (`floors_group`): the local broker
   keeps no commit metadata, but it keeps offsets. Stored after the input commit, a floor is never above an
   output of an uncommitted record; older floors are lower still, so a lost write only costs a longer read.
3. **Recover.** When the worker is given input partitions, before processing any of their records it reads
   their floors, then every output partition from the lowest floor to its true end, and collects the stamps
   of those inputs (`read_emitted`). It then processes the records as usual (the processor's state, such as
   the DUPLICATE_ALLOW_ONE window, learns them again) and drops the outputs already in the log
   (`drop_emitted`): the log is authoritative. If only some outputs of an input made it (acknowledged in one
   partition, not in another, at the crash), the missing ones are produced, provided the input gives the
   same outputs as before (same count, same topics at the indexes found); if it does not (a retry that was not
   due then and is now), none are produced again: what the log has stands.

4. **Memory.** In the same step, a processor that remembers what it accepted (`runtime.accepted_memory`: the
   validator's duplicate window) gets that memory back for the new partitions: the output records of its
   window are read back and handed to it (`rebuild_memory`), so a duplicate of a record accepted before the
   restart or rebalance is still one.

The first time an input partition is seen (no floors yet) its floors are written before any of its records
is processed, so a crash before the first commit is covered too. A worker upgraded from a version without
floors cannot know what it emitted before: it says so in the log once per partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from services.contracts.headers import SOURCE, TRACEPARENT
from services.validator.runtime import AcceptedMemory, Header, Output, headers_with_trace

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition)
Floors = dict[Partition, int]  # output partition -> lowest position an uncommitted output can have


# --- stamps --------------------------------------------------------------------------------------------------
def stamp_outputs(outputs: Sequence[Output]) -> list[bytes | None]:
    """The `lp-source` value of each output (None for an output without a source record).

    Outputs of one source are numbered in the order the processor returned them, which is the order the
    runtime produces them. Hot path (0.4 us an output here): the usual batch, one output per source, is stamped
    by one comprehension; otherwise runs of one source are numbered in one pass (a processor returns each
    record's outputs together), and a source that comes back later takes the general way."""
    sources = [output.source for output in outputs]
    distinct = set(map(id, sources))
    if len(distinct) == len(sources) and id(None) not in distinct:
        one_each: list[bytes | None] = [
            b"%s:%d:%d:0/1" % (source.topic.encode(), source.partition, source.offset)  # type: ignore[union-attr]
            for source in sources
        ]
        return one_each
    stamps: list[bytes | None] = []
    append = stamps.append
    seen: set[int] = set()
    total, i = len(outputs), 0
    while i < total:
        source = outputs[i].source
        if source is None:
            append(None)
            i += 1
            continue
        j = i + 1
        while j < total and outputs[j].source is source:
            j += 1
        if id(source) in seen:
            return _stamp_scattered(outputs)
        seen.add(id(source))
        count = j - i
        if count == 1:
            append(b"%s:%d:%d:0/1" % (source.topic.encode(), source.partition, source.offset))
        else:
            prefix = b"%s:%d:%d:" % (source.topic.encode(), source.partition, source.offset)
            for index in range(count):
                append(b"%s%d/%d" % (prefix, index, count))
        i = j
    return stamps


def _stamp_scattered(outputs: Sequence[Output]) -> list[bytes | None]:
    """`stamp_outputs` for outputs of one source that are not next to each other."""
    counts: dict[int, int] = {}
    for output in outputs:
        if output.source is not None:
            counts[id(output.source)] = counts.get(id(output.source), 0) + 1
    seen: dict[int, int] = {}
    stamps: list[bytes | None] = []
    for output in outputs:
        source = output.source
        if source is None:
            stamps.append(None)
            continue
        index = seen.get(id(source), 0)
        seen[id(source)] = index + 1
        stamps.append(
            b"%s:%d:%d:%d/%d" % (source.topic.encode(), source.partition, source.offset, index, counts[id(source)])
        )
    return stamps


def parse_stamp(value: bytes | None) -> tuple[str, int, int, int, int] | None:
    """(topic, partition, offset, index, count) of an `lp-source` value, None if it is not one."""
    if not value:
        return None
    try:
        topic, partition, offset, part = value.decode("ascii").rsplit(":", 3)
        index, count = part.split("/")
        return topic, int(partition), int(offset), int(index), int(count)
    except (UnicodeDecodeError, ValueError):
        return None


def produced_headers(output: Output, fallback: Sequence[Header], stamp: bytes | None) -> list[Header]:
    """What `output` is produced with: `with_stamp(headers_with_trace(output, fallback), stamp)`, in one pass for
    the usual output, which carries its own trace context and no stamp (hot: once per output)."""
    traced = False
    for name, _ in output.headers:
        if name == TRACEPARENT:
            traced = True
        elif name == SOURCE:
            traced = False
            break
    if not traced:
        return with_stamp(headers_with_trace(output, fallback), stamp)
    headers = list(output.headers)
    if stamp is not None:
        headers.append((SOURCE, stamp))
    return headers


def with_stamp(headers: list[Header], stamp: bytes | None) -> list[Header]:
    """`headers` with `lp-source` set to `stamp` (a copied input header of that name is replaced)."""
    for name, _ in headers:
        if name == SOURCE:
            headers = [header for header in headers if header[0] != SOURCE]
            break
    if stamp is not None:
        headers.append((SOURCE, stamp))
    return headers


# --- what is already in the log ------------------------------------------------------------------------------
@dataclass(slots=True)
class Logged:
    """The outputs of one input record found in the output partitions: their count then, index -> topic."""

    count: int
    topics: dict[int, str] = field(default_factory=dict)


Emitted = dict[Partition, dict[int, Logged]]  # input partition -> input offset -> its outputs in the log


def note_stamp(emitted: Emitted, output_topic: str, value: bytes | None) -> None:
    """Add one output's stamp to `emitted` if it comes from one of its input partitions."""
    parsed = parse_stamp(value)
    if parsed is None:
        return
    topic, partition, offset, index, count = parsed
    by_offset = emitted.get((topic, partition))
    if by_offset is None:
        return
    logged = by_offset.get(offset)
    if logged is None:
        logged = by_offset[offset] = Logged(count)
    logged.topics[index] = output_topic


def drop_emitted(
    outputs: Sequence[Output], stamps: Sequence[bytes | None], emitted: Emitted
) -> tuple[list[Output], list[bytes | None], int]:
    """`outputs` (and their stamps) without those already in the log, and how many were dropped.

    Per input record found in `emitted`: if it gives the same outputs as before (count, and topic at every index
    found), only the indexes not found are kept; otherwise none (the log stands). Its entry is then removed."""
    groups: dict[tuple[Partition, int], list[int]] = {}
    for position, output in enumerate(outputs):
        source = output.source
        if source is None:
            continue
        by_offset = emitted.get((source.topic, source.partition))
        if by_offset is not None and source.offset in by_offset:
            groups.setdefault(((source.topic, source.partition), source.offset), []).append(position)
    if not groups:
        return list(outputs), list(stamps), 0
    dropped: set[int] = set()
    for (tp, offset), positions in groups.items():
        logged = emitted[tp].pop(offset)
        same = logged.count == len(positions) and all(
            index < len(positions) and outputs[positions[index]].topic == topic
            for index, topic in logged.topics.items()
        )
        for index, position in enumerate(positions):
            if not same or index in logged.topics:
                dropped.add(position)
    kept = [o for position, o in enumerate(outputs) if position not in dropped]
    kept_stamps = [s for position, s in enumerate(stamps) if position not in dropped]
    return kept, kept_stamps, len(dropped)


def read_emitted(
    config: Mapping[str, Any], starts: Mapping[Partition, int], inputs: Iterable[Partition], timeout: float = 120.0
) -> Emitted:
    """The stamps of outputs of `inputs` found in the output partitions `starts`, each read from its start to its
    true end. (The local broker's ListOffsets is wrong; the end a fetch reports is right: partition EOF.)"""
    emitted: Emitted = {tp: {} for tp in inputs}
    pending = {tp for tp, start in starts.items()}
    if not pending:
        return emitted
    consumer = Consumer(
        {
            **config,
            "group.id": "lp-validator-recovery",  # assign() only: never joins, never commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, start) for (topic, partition), start in starts.items()])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading output partitions {sorted(pending)}: not at their end after {timeout}s")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is None:
                    for name, value in message.headers() or ():
                        if name == SOURCE:
                            note_stamp(emitted, message.topic(), value)
                            break
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((message.topic(), message.partition()))
                else:
                    raise KafkaException(error)
    finally:
        consumer.close()
    return emitted


# --- floors, stored as the offsets of one consumer group per input partition ---------------------------------------
def floors_group(group: str, input_tp: Partition) -> str:
    """The consumer group whose committed offsets are the floors of `input_tp` (never joined by anyone)."""
    return f"{group}.floors.{input_tp[0]}.{input_tp[1]}"


class FloorStore:
    """Reads and writes floors (blocking calls: run them in a thread)."""

    def __init__(self, config: Mapping[str, Any], group: str, timeout: float = 30.0) -> None:
        self.group = group
        self.timeout = timeout
        self._admin = AdminClient(dict(config))

    def latest(self, partitions: Iterable[Partition]) -> Floors:
        """Lower bounds of the partitions' ends now. (The local broker answers the start of the last record batch
        + 1, at most the true end: still a floor.)"""
        wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
        if not wanted:
            return {}
        futures = self._admin.list_offsets({tp: OffsetSpec.latest() for tp in wanted}, request_timeout=self.timeout)
        return {(tp.topic, tp.partition): max(0, future.result().offset) for tp, future in futures.items()}

    def read(self, inputs: Iterable[Partition]) -> dict[Partition, Floors]:
        """The stored floors of each input partition ({} where none are stored)."""
        found: dict[Partition, Floors] = {}
        for tp in inputs:
            request = ConsumerGroupTopicPartitions(floors_group(self.group, tp))
            futures = self._admin.list_consumer_group_offsets([request], request_timeout=self.timeout)
            result = next(iter(futures.values())).result()
            found[tp] = {(p.topic, p.partition): p.offset for p in result.topic_partitions or () if p.offset >= 0}
        return found

    def write(self, inputs: Iterable[Partition], floors: Floors) -> None:
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(floors.items())]
        if not offsets:
            return
        for tp in inputs:
            request = ConsumerGroupTopicPartitions(floors_group(self.group, tp), offsets)
            futures = self._admin.alter_consumer_group_offsets([request], request_timeout=self.timeout)
            next(iter(futures.values())).result()


@dataclass(slots=True)
class Recovered:
    """What recovery found for the input partitions it was asked about."""

    emitted: Emitted
    newest: dict[Partition, int]  # input partition -> highest input offset with outputs found
    without_floors: list[Partition]


def recover(
    config: Mapping[str, Any], store: FloorStore, inputs: Sequence[Partition], current: Floors, timeout: float = 120.0
) -> Recovered:
    """Read the floors of `inputs` and the output partitions above them; inputs without floors get `current`
    written first (valid: none of their records has been processed by this worker yet)."""
    stored = store.read(inputs)
    without = [tp for tp in inputs if not stored.get(tp)]
    if without:
        store.write(without, current)
    starts: dict[Partition, int] = {}
    for tp in inputs:
        for output_tp, floor in stored.get(tp, {}).items():
            starts[output_tp] = min(floor, starts.get(output_tp, floor))
    emitted = read_emitted(config, starts, [tp for tp in inputs if tp not in without], timeout)
    emitted = {tp: by_offset for tp, by_offset in emitted.items() if by_offset}
    newest = {tp: max(by_offset) for tp, by_offset in emitted.items()}
    return Recovered(emitted, newest, without)


# --- the processor's memory of what it accepted (the duplicate window), read back from the output topics -------
def accepted_partitions(
    inputs: Iterable[Partition], sources: Mapping[str, str], counts: Mapping[str, int]
) -> list[Partition]:
    """The output partitions holding what the input partitions `inputs` accepted: records are keyed alike and
    partitioned by the same hash of the key, so with equal partition counts input partition p's accepted
    records are in output partition p; otherwise they may be in any of them."""
    wanted: set[Partition] = set()
    for topic, partition in inputs:
        output = sources.get(topic)
        if output is None or output not in counts:
            continue
        if counts.get(topic) == counts[output]:
            wanted.add((output, partition))
        else:
            wanted.update((output, p) for p in range(counts[output]))
    return sorted(wanted)


@dataclass(slots=True)
class Reread:
    """What `read_accepted` read back."""

    partitions: int
    records: int  # read from the output partitions (within the bounds)
    remembered: int  # taken by the processor
    seconds: float
    by_time: bool  # the broker located the time bound itself (ListOffsets by timestamp)


def time_index_works(admin: AdminClient, partitions: Sequence[Partition], timeout: float) -> bool:
    """Whether the broker answers ListOffsets by timestamp: asked for a time after every record, a Kafka broker
    answers -1 (no such offset). The local broker (Tansu 0.6) answers 0 for any time: there the time bound is
    applied while reading, by each record's timestamp, and the count bound alone limits where reading starts."""
    if not partitions:
        return False
    future = int(time.time() * 1000) + 86_400_000
    futures = admin.list_offsets(
        {TopicPartition(t, p): OffsetSpec.for_timestamp(future) for t, p in partitions[:1]}, request_timeout=timeout
    )
    return all(f.result().offset < 0 for f in futures.values())


def read_accepted(
    config: Mapping[str, Any],
    partitions: Sequence[Partition],
    *,
    since_ms: int,
    max_records: int,
    remember: Callable[[Iterable[bytes | None]], int],
    timeout: float = 120.0,
) -> Reread:
    """Hand `remember` the values of the records of `partitions` written since `since_ms` (record timestamp, the
    producer's clock), oldest first per partition, to their true end. At most about `max_records` in all: each
    partition is read from at least its "latest" (a lower bound of its end here) less its share of it."""
    started = time.monotonic()
    if not partitions:
        return Reread(0, 0, 0, 0.0, False)
    admin = AdminClient(dict(config))
    tps = [TopicPartition(t, p) for t, p in partitions]
    earliest = admin.list_offsets({tp: OffsetSpec.earliest() for tp in tps}, request_timeout=timeout)
    latest = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout)
    share = max(1, max_records // len(partitions))
    starts: dict[Partition, int] = {}
    for tp in tps:
        first = max(0, earliest[tp].result().offset)
        starts[(tp.topic, tp.partition)] = max(first, latest[tp].result().offset - share)
    by_time = time_index_works(admin, list(partitions), timeout)
    if by_time:
        located = admin.list_offsets({tp: OffsetSpec.for_timestamp(since_ms) for tp in tps}, request_timeout=timeout)
        for tp, found in located.items():
            offset = found.result().offset
            position = (tp.topic, tp.partition)
            starts[position] = max(starts[position], offset) if offset >= 0 else -1  # -1: nothing that recent
    pending = {tp for tp, start in starts.items() if start >= 0}
    records = remembered = 0
    consumer = Consumer(
        {
            **config,
            "group.id": "lp-validator-memory",  # assign() only: never joins, never commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
        }
    )
    try:
        consumer.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in sorted(pending)])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading back accepted records of {sorted(pending)}: not at their end after {timeout}s"
                )
            values: list[bytes | None] = []
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is None:
                    if message.timestamp()[1] >= since_ms:
                        values.append(message.value())
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((message.topic(), message.partition()))
                else:
                    raise KafkaException(error)
            if values:
                records += len(values)
                remembered += remember(values)
    finally:
        consumer.close()
    return Reread(len(partitions), records, remembered, time.monotonic() - started, by_time)


MEMORY_MARGIN_S = 300.0  # clock skew between the record timestamps and event times a window may span


def rebuild_memory(
    config: Mapping[str, Any], inputs: Sequence[Partition], memory: AcceptedMemory, timeout: float = 120.0
) -> Reread:
    """Feed `memory` the records its input partitions `inputs` accepted within its window (plus a margin), from
    the output topics it names, bounded by its size (blocking: run it in a thread)."""
    metadata = AdminClient(dict(config)).list_topics(timeout=timeout)  # all topics: naming one would create it
    counts = {name: len(entry.partitions) for name, entry in metadata.topics.items() if entry.error is None}
    partitions = accepted_partitions(inputs, memory.sources, counts)
    since_ms = int((time.time() - memory.window_s - MEMORY_MARGIN_S) * 1000)
    return read_accepted(
        config,
        partitions,
        since_ms=since_ms,
        max_records=memory.max_records,
        remember=memory.remember,
        timeout=timeout,
    )
