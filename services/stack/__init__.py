"""The local embedded stack: Kafka (Tansu), PostgreSQL, S3 (SeaweedFS) and Snowflake (fakesnow), no Docker.

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
    "SeaweedS3",
    "StackAlreadyRunning",
    "StackError",
    "StackSettings",
    "local_stack",
]
