"""The shared frame of every sink: consume, batch per partition, write, dead-letter, then commit.

A sink (ClickHouse, Iceberg, ...) implements `Sink.write(batch)` for the records of ONE topic-partition and
says which of them the store refused; `SinkRunner` does everything around it, the same way for every sink:

- consumes with the kit's `KafkaConsumer` (manual commits) and keeps one buffer per assigned partition;
- checks every payload against the topic's Avro contract (`AvroDeserializer`): a record that does not decode
  goes to the dead-letter topic with its `DecodeErrorCode`, it never stops the sink;
- flushes a buffer when it holds `BATCH_MAX_ROWS` records or its first record waited `BATCH_MAX_AGE_S`, and
  all buffers at once when together they hold `BATCH_MAX_ROWS` (many partitions, none full alone);
- on `SinkBackpressure` (store slow or down) pauses the partition, backs off exponentially with jitter and
  retries the SAME batch, then resumes: nothing is dropped and nothing is skipped;
- produces the rejected records through the service's dead-letter route (`DeadLetterRoute`: the service
  gives the format, e.g. original bytes with the reason in `lp-dlq-*` headers; the kit knows none),
  waits for the broker's acknowledgement, and only then commits `last offset + 1` of the batch;
- on revoke flushes and commits the revoked partitions; on SIGTERM (`close`) flushes and commits everything.

Idempotence is the sink's half of the contract: `PartitionBatch.dedup_token` names the consumed offset range,
so a store that remembers tokens (ClickHouse's `insert_deduplication_token`) ignores a replayed batch. For the
token to repeat, a replay must cut the same batches: a sink that can tell which batches it already holds
returns their last offsets from `written_batch_ends`, and the runner ends replayed batches exactly there. A
sink that keeps its own offsets (Iceberg commits them with the data) returns them from `stored_offsets` and
the runner seeks there instead of the Kafka committed offset.

A store whose every write costs a lot whatever its size (ClickHouse: a part per table and view per insert)
sets `Sink.group_writes`: when any partition is due, the runner hands the batches of ALL its partitions to
`write_group` at once, retries that group as a whole, and on replay regroups stored batches as they were
written (`WrittenBatch.group`), so the group's token repeats too.

Delivery to the dead-letter topic is at least once: a crash after the dead letters were acknowledged but
before the commit dead-letters those records again on replay (each carries its original topic, partition
and offset in headers, so a reader can tell).

Modules: `records` (what a sink reads), `base` (what a sink implements and answers), `settings`, `runner` (the
frame above), `service` (a sink as a `Service`).
"""

from services.kit.sink.base import (
    DeadLetterRoute,
    DecodeMode,
    OutgoingRecord,
    Rejection,
    RejectionStage,
    Sink,
    SinkBackpressure,
    WriteResult,
    WrittenBatch,
)
from services.kit.sink.records import (
    LazyRecords,
    PartitionBatch,
    SinkRecord,
    TopicPartition,
    UndecodableRecord,
    check_header,
    fingerprint_bytes,
    messages_of,
)
from services.kit.sink.runner import RunnerStats, SinkRunner, lookup_topic_ids
from services.kit.sink.service import SinkService
from services.kit.sink.settings import RunnerConfig, SinkSettings, backoff_delay

__all__ = [
    "DeadLetterRoute",
    "DecodeMode",
    "LazyRecords",
    "OutgoingRecord",
    "PartitionBatch",
    "Rejection",
    "RejectionStage",
    "RunnerConfig",
    "RunnerStats",
    "Sink",
    "SinkBackpressure",
    "SinkRecord",
    "SinkRunner",
    "SinkService",
    "SinkSettings",
    "TopicPartition",
    "UndecodableRecord",
    "WriteResult",
    "WrittenBatch",
    "backoff_delay",
    "check_header",
    "fingerprint_bytes",
    "lookup_topic_ids",
    "messages_of",
]
