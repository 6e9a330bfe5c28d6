"""Settings of the local embedded stack: state dir, ports and credentials.

Every field can be changed with an environment variable ``LP_<FIELD>`` (e.g. ``LP_BROKER_PORT=29092``,
``LP_STATE_DIR=/tmp/lp``). Defaults sit in the 15xxx-19xxx range, away from the well-known ports of a real
Kafka/PostgreSQL/MinIO a developer may already run.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.config import Port
from services.kit.paths import repo_root

HOST = "127.0.0.1"
DEFAULT_STATE_DIR = repo_root() / ".local"

# `weed mini` dials its admin gRPC server at admin.port + 10000 whatever -admin.port.grpc says,
# so the admin gRPC port is derived instead of configurable.
SEAWEED_GRPC_OFFSET = 10000


class StackSettings(BaseSettings):
    """Where the stack keeps its state and which loopback ports it uses."""

    model_config = SettingsConfigDict(env_prefix="LP_", extra="ignore")

    state_dir: Path = Field(default=DEFAULT_STATE_DIR, description="All data, logs, sockets and stack.json.")

    # Kafka protocol broker (Tansu).
    broker_port: Port = 19092

    # PostgreSQL.
    postgres_port: Port = 15432
    postgres_user: str = "postgres"
    postgres_db: str = "shop"

    # S3 (SeaweedFS `weed mini`): every port is pinned, else it opens default ports on all interfaces.
    s3_port: Port = 18333
    s3_grpc_port: Port = 18334
    iceberg_port: Port = 18181
    seaweed_master_port: Port = 18340
    seaweed_master_grpc_port: Port = 18341
    seaweed_volume_port: Port = 18342
    seaweed_volume_grpc_port: Port = 18343
    seaweed_filer_port: Port = 18344
    seaweed_filer_grpc_port: Port = 18345
    seaweed_admin_port: Port = 18346
    s3_bucket: str = "lakehouse"
    aws_access_key_id: str = "lpadmin"
    aws_secret_access_key: str = "lpadmin-secret"
    aws_region: str = "us-east-1"

    # Snowflake emulator (fakesnow server). It accepts any account/user/password.
    snowflake_port: Port = 18080
    snowflake_account: str = "lp_local"
    snowflake_user: str = "lp"
    snowflake_password: str = "lp-local"
    snowflake_database: str = "LAMBDA_PIPELINE"
    # Keep Snowflake databases as DuckDB files under the state dir (False: in memory, lost on stop).
    snowflake_persist: bool = True

    # Prometheus (Debian's package; the stack runs without it when the binary is missing).
    prometheus_port: Port = 19090

    # Seconds to wait for each component to become ready / to exit after the stop signal.
    start_timeout: float = 60.0
    stop_timeout: float = 15.0

    ENV_PREFIX: ClassVar[str] = "LP_"

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        # Children run with cwd=state_dir and get paths inside it: a relative path would mean two places.
        return value.expanduser().resolve()

    @field_validator("seaweed_admin_port")
    @classmethod
    def _room_for_grpc(cls, value: int) -> int:
        if value + SEAWEED_GRPC_OFFSET > 65535:
            raise ValueError(
                f"must be at most {65535 - SEAWEED_GRPC_OFFSET} (its gRPC port is {SEAWEED_GRPC_OFFSET} above)"
            )
        return value

    @property
    def seaweed_admin_grpc_port(self) -> int:
        return self.seaweed_admin_port + SEAWEED_GRPC_OFFSET

    @classmethod
    def port_fields(cls) -> list[str]:
        """Names of the fields that are TCP ports (all bound on 127.0.0.1)."""
        return [name for name in cls.model_fields if name.endswith("_port")]

    @classmethod
    def env_var(cls, field: str) -> str:
        """The environment variable that sets ``field`` (e.g. ``broker_port`` -> ``LP_BROKER_PORT``)."""
        return f"{cls.ENV_PREFIX}{field.upper()}"

    def ports(self) -> dict[str, int]:
        """Every port the stack binds, by field name (the derived admin gRPC port included)."""
        ports = {name: getattr(self, name) for name in self.port_fields()}
        ports["seaweed_admin_grpc_port"] = self.seaweed_admin_grpc_port
        return ports

    @classmethod
    def with_free_ports(cls, **overrides: Any) -> StackSettings:
        """Settings whose ports are all currently free (for tests and parallel stacks).

        ``overrides`` (e.g. ``state_dir=tmp_path``) win over environment variables and the picked ports.
        A port can still be taken by someone else before the stack binds it; the stack then fails with
        a clear error, which is the best any port picker can do.
        """
        fields = [f for f in cls.port_fields() if f != "seaweed_admin_port"]
        ports = pick_free_ports(len(fields))
        values: dict[str, Any] = dict(zip(fields, ports, strict=True))
        values["seaweed_admin_port"] = pick_free_port_pair(SEAWEED_GRPC_OFFSET, exclude=set(ports))
        values.update(overrides)
        return cls(**values)


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if a server could bind ``host:port`` now (SO_REUSEADDR, as servers do, so TIME_WAIT is ok)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports the kernel reports free (all sockets held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def pick_free_port_pair(offset: int, exclude: set[int] | None = None, host: str = HOST) -> int:
    """A port ``p`` with both ``p`` and ``p + offset`` free (and not in ``exclude``)."""
    exclude = exclude or set()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, 65535 - offset)
        pair = (port, port + offset)
        if any(p in exclude for p in pair):
            continue
        if all(port_is_free(p, host) for p in pair):
            return port
    raise RuntimeError(f"no free port pair (p, p+{offset}) found on {host}")
