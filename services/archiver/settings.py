"""The archiver's configuration, from the environment (docs/archiver.md has the table)."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.contracts.schema_store import SchemaStoreSettings
from services.kit.config import OptionalBrokerList, ServiceSettings
from services.kit.sink import SinkSettings
from services.stores.iceberg import CatalogSettings

from .schemas import DEFAULT_DEAD_LETTER_TOPICS


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class ArchiverCommandSettings(CatalogSettings, ServiceSettings):
    """The commands (`init`, `stats`, `compact`, `replay`, ...): the catalog, and Kafka for `replay` only."""

    kafka_bootstrap_servers: OptionalBrokerList = Field("", description="Only `replay` needs Kafka.")


class ArchiverSettings(CatalogSettings, SinkSettings, SchemaStoreSettings):
    """The service (`python -m services.archiver run`): the catalog, the kit's sink settings, and its own."""

    service_name: str = "archiver"
    consumer_group: str = Field("lp-archiver", min_length=1, description="Kafka consumer group of the archiver.")
    batch_max_rows: int = Field(
        50_000, ge=1, le=1_000_000, description="Records of one partition decoded together (then buffered)."
    )
    batch_max_age_s: float = Field(2.0, gt=0, description="Hand a partition's records over after this long.")
    archiver_events_topics: str = Field("events.processed", description="Topics archived into user_events.")
    archiver_transactions_topics: str = Field("transactions.processed", description="Topics into transactions.")
    archiver_dead_letter_topics: str = Field(
        ",".join(DEFAULT_DEAD_LETTER_TOPICS), description="Dead-letter topics archived into dead_letters."
    )
    archiver_tables: str = Field(
        "user_events,transactions,dead_letters", description="Tables this process archives (comma list)."
    )
    archiver_commit_rows: int = Field(
        500_000, ge=1, description="Commit a table when this many rows are buffered (few, large files)."
    )
    archiver_commit_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="... or when the buffered Kafka payloads reach this many bytes."
    )
    archiver_commit_interval_s: float = Field(
        60.0, gt=0, description="... or when the oldest buffered row is this old (bounds the archive's lag)."
    )
    archiver_commit_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Scheduling niceness of the commit threads (0: as the consumer). They yield the CPU to the "
        "consume-and-decode loop, the archiver's bottleneck, and use what it leaves.",
    )
    archiver_target_file_size_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Iceberg write.target-file-size-bytes of new tables."
    )

    def topics_of(self, table: str) -> tuple[str, ...]:
        from .schemas import DEAD_LETTERS, TRANSACTIONS, USER_EVENTS

        return _csv(
            {
                USER_EVENTS: self.archiver_events_topics,
                TRANSACTIONS: self.archiver_transactions_topics,
                DEAD_LETTERS: self.archiver_dead_letter_topics,
            }[table]
        )

    @property
    def table_names(self) -> tuple[str, ...]:
        return _csv(self.archiver_tables)

    @field_validator("archiver_tables", mode="after")
    @classmethod
    def _known_tables(cls, value: str) -> str:
        from .schemas import DEAD_LETTERS, TRANSACTIONS, USER_EVENTS

        names = _csv(value)
        unknown = set(names) - {USER_EVENTS, TRANSACTIONS, DEAD_LETTERS}
        if unknown or not names:
            raise ValueError(
                f"unknown table(s) {sorted(unknown)} or none given (user_events, transactions, dead_letters)"
            )
        return value
