"""The local embedded stack: Kafka (Tansu), PostgreSQL, S3 (SeaweedFS), Snowflake (fakesnow), Prometheus; no Docker.

See docs/local-stack.md. Public API::

    from services.stack import LocalStack, StackSettings
"""

from services.stack.components import (
    Component,
    ComponentError,
    FakeSnowflake,
    KafkaBroker,
    PortInUseError,
    Postgres,
    SeaweedS3,
)
from services.stack.prometheus import Prometheus
from services.stack.settings import StackSettings
from services.stack.stack import LocalStack, StackAlreadyRunning, StackError, local_stack

__all__ = [
    "Component",
    "ComponentError",
    "FakeSnowflake",
    "KafkaBroker",
    "LocalStack",
    "PortInUseError",
    "Postgres",
    "Prometheus",
    "SeaweedS3",
    "StackAlreadyRunning",
    "StackError",
    "StackSettings",
    "local_stack",
]
