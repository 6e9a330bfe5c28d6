"""The operator's configuration: environment variables, validated once at start (a wrong one exits 2 naming it)."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.kit.config import BindPort, ServiceSettings

_DNS_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class OperatorConfig(ServiceSettings):
    """Every field ``x`` is read from ``X``; KAFKA_*, HTTP_PORT (kopf's liveness ``/healthz``), LOG_* as every
    service. Defaults suit a cluster; the tests shorten the intervals."""

    service_name: str = Field("operator", description="Name in logs and Events (reportingInstance).")
    operator_namespaces: str = Field(
        "", description="Comma-separated namespaces to watch; empty: every namespace (needs a ClusterRole)."
    )
    operator_peering: str = Field(
        "lambda-pipeline",
        description="KopfPeering object that keeps a second operator from acting at once; empty: standalone.",
    )
    operator_drift_interval_s: float = Field(300.0, gt=0, description="How often the timer checks for drift.")
    operator_kafka_timeout_s: float = Field(30.0, gt=0, description="Seconds per Kafka operation.")
    operator_retry_backoff_s: float = Field(5.0, gt=0, description="First retry delay after a Kafka error.")
    operator_retry_backoff_max_s: float = Field(300.0, gt=0, description="Retry delays double up to this.")
    operator_delete_give_up_s: float = Field(
        120.0, gt=0, description="Delete policy with no broker: give up after this, release the finalizer."
    )
    operator_cap_replication_factor: bool = Field(
        False, description="Lower replication factors to the broker count (single-broker dev clusters only)."
    )
    operator_metrics_port: BindPort = Field(8081, description="Port of /metrics (Prometheus); 0: any.")

    @field_validator("operator_namespaces")
    @classmethod
    def _namespaces(cls, value: str) -> str:
        for namespace in (part.strip() for part in value.split(",") if part.strip()):
            if not set(namespace) <= _DNS_LABEL_CHARS or len(namespace) > 63:
                raise ValueError(f"{namespace!r} is not a namespace name (a DNS-1123 label)")
        return value

    @field_validator("operator_peering")
    @classmethod
    def _peering(cls, value: str) -> str:
        if value and (not set(value) <= _DNS_LABEL_CHARS | {"."} or len(value) > 253):
            raise ValueError(f"{value!r} is not an object name")
        return value

    @property
    def namespaces(self) -> list[str]:
        return [part.strip() for part in self.operator_namespaces.split(",") if part.strip()]

    def retry_delay(self, retry: int) -> float:
        """The TemporaryError delay of the ``retry``-th retry: doubling from the first delay, capped."""
        return min(self.operator_retry_backoff_s * (2 ** min(retry, 30)), self.operator_retry_backoff_max_s)
