"""Configuration of the ClickHouse sink and of its query command, from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.paths import repo_root
from services.kit.sink import SinkSettings


def default_chdb_path() -> Path:
    return repo_root() / ".local" / "clickhouse"


class ClickHouseSettings(BaseSettings):
    """Where ClickHouse is (shared by the sink and `python -m services.clickhouse_sink query`)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    clickhouse_client: Literal["chdb", "native"] = Field(
        "chdb", description="chdb: in-process engine with data in CLICKHOUSE_CHDB_PATH; native: a ClickHouse server."
    )
    clickhouse_chdb_path: Path = Field(default_factory=default_chdb_path, description="chDB data folder (local).")
    clickhouse_host: str = Field("localhost", min_length=1, description="Server host (native).")
    clickhouse_port: int = Field(9000, ge=1, le=65535, description="Native protocol port (9440 with TLS).")
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    clickhouse_secure: bool = Field(False, description="TLS to the server (native).")
    clickhouse_database: str = Field("lambda_pipeline", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    clickhouse_cluster: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Cluster name: DDL runs ON CLUSTER with Replicated* engines (native only).",
    )
    clickhouse_sink_query_port: int = Field(
        8124, ge=-1, le=65535, description="Port of the sink's read-only /query endpoint (-1: off, 0: any)."
    )
    clickhouse_sink_query_host: str = Field("127.0.0.1", description="Address the /query endpoint binds to.")
    clickhouse_sink_query_url: str | None = Field(
        None, description="Where the query command finds a running sink (default: http://127.0.0.1:<query port>)."
    )

    @field_validator("clickhouse_chdb_path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def query_url(self) -> str:
        return self.clickhouse_sink_query_url or f"http://127.0.0.1:{self.clickhouse_sink_query_port}"


class ClickHouseSinkSettings(SinkSettings, ClickHouseSettings):
    """The sink service: SinkSettings (Kafka, batching, backoff) plus ClickHouse and its own options."""

    service_name: str = "clickhouse-sink"
    consumer_group: str = Field("lp-clickhouse-sink", min_length=1, description="Kafka consumer group.")
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
