"""What every sink service is configured with (`SinkSettings`), the runner's share of it (`RunnerConfig`), and
the backoff between retries."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field

from services.kit.config import ServiceSettings
from services.kit.reconnect import Backoff


class SinkSettings(ServiceSettings):
    """What every sink service shares (field `x` from variable `X`)."""

    consumer_group: str = Field(..., min_length=1, description="Kafka consumer group of the sink.")
    batch_max_rows: int = Field(50_000, ge=1, le=1_000_000, description="Flush a partition's buffer at this size.")
    batch_max_age_s: float = Field(
        1.0, gt=0, description="Flush a partition's buffer when its first record is this old."
    )
    poll_max_records: int = Field(10_000, ge=1, description="Most records taken from the consumer per poll.")
    backoff_initial_s: float = Field(0.2, gt=0, description="First retry delay after backpressure (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest retry delay after backpressure.")
    revoke_flush_timeout_s: float = Field(
        10.0, gt=0, description="Budget to flush a revoked partition; after it the batch is left to the new owner."
    )
    dlq_ack_timeout_s: float = Field(30.0, gt=0, description="Wait for the broker to acknowledge dead letters.")


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    batch_max_rows: int = 50_000
    batch_max_age_s: float = 1.0
    poll_max_records: int = 10_000
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    revoke_flush_timeout_s: float = 10.0
    dlq_ack_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: SinkSettings) -> RunnerConfig:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(max, initial * 2^(attempt-1))."""
    return Backoff(initial_s=initial, max_s=maximum).delay(attempt, rng)  # the kit's one backoff formula
