"""Configuration of the ClickHouse sink, from the environment (where ClickHouse is: `services.stores.clickhouse`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.contracts.schema_store import SchemaStoreSettings
from services.kit.config import BindHost
from services.kit.sink import SinkSettings
from services.stores.clickhouse import ClickHouseSettings


class ClickHouseSinkSettings(SinkSettings, ClickHouseSettings, SchemaStoreSettings):
    """The sink service: SinkSettings (Kafka, batching, backoff) plus ClickHouse and its own options."""

    service_name: str = "clickhouse-sink"
    consumer_group: str = Field("lp-clickhouse-sink", min_length=1, description="Kafka consumer group.")
    clickhouse_cluster: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Cluster name: DDL runs ON CLUSTER with Replicated* engines (native only).",
    )
    clickhouse_sink_query_host: BindHost = Field("127.0.0.1", description="Address the /query endpoint binds to.")
    # Half a second: a flush (all partitions, one insert per topic) waits at most this long for more records;
    # at 2k events/s it keeps event-to-visible under 2 s with room for the insert itself.
    batch_max_age_s: float = Field(0.5, gt=0, description="Flush when a buffered record is this old.")
    # Every insert has a fixed cost (a part per table and view, ~70 ms on chDB): at full speed 100k-row inserts
    # do twice the rows/s of 10k ones. Under a light load the age above decides, so latency does not change.
    batch_max_rows: int = Field(100_000, ge=1, le=1_000_000, description="Most records per insert.")
    clickhouse_sink_events_topic: str = Field("events.processed", min_length=1)
    clickhouse_sink_transactions_topic: str = Field(
        "transactions.processed", description="Empty: do not sink transactions."
    )
    clickhouse_sink_report_file: Path | None = Field(
        None, description="On stop, write rows per table and event-to-visible percentiles here (JSON)."
    )
    clickhouse_sink_scratch_dir: Path | None = Field(
        None, description="Where a batch's Avro container is written for decoding (default /dev/shm or tmp)."
    )
    clickhouse_sink_latency_sample_every: int = Field(
        8, ge=1, description="Event-to-visible latency is measured on one row in this many."
    )
    clickhouse_sink_kill_after_inserts: int | None = Field(
        None,
        ge=1,
        description="Tests only: SIGKILL this process right after its Nth insert, before the Kafka commit.",
    )
    clickhouse_sink_fault_file: Path | None = Field(
        None,
        description="Tests only (chDB): while this file exists the sink's tables are detached, so ClickHouse "
        "refuses every write as it does when a table is unavailable.",
    )
