"""Service configuration from the environment, validated once at start.

Every service declares a `ServiceSettings` subclass; `load_settings` turns a missing or malformed variable into
one clear message naming the variable, and exits, instead of a stack trace half-way through start-up.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.exits import ExitCode


class ServiceSettings(BaseSettings):
    """Settings every service shares. Field `x` is read from the environment variable `X`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    service_name: str = Field("lambda-pipeline", description="Name in logs, metrics and traces.")
    http_port: int = Field(8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics (0: any).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field("json", description="json for machines, text for a terminal.")
    kafka_bootstrap_servers: str = Field(..., min_length=1, description="host:port[,host:port...]")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    otel_exporter_otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint of the trace backend (e.g. Grafana Tempo's :4318)."
    )
    otel_traces_file: str | None = Field(None, description="Write finished spans as JSON lines here (local).")
    otel_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    shutdown_timeout_s: float = Field(20.0, gt=0, description="Budget to flush and commit on SIGTERM.")


S = TypeVar("S", bound=BaseSettings)

# A setting whose name holds one of these is a secret (and a `SecretStr`): its value is never shown in an error.
SECRET_WORDS = ("password", "secret", "token", "credential", "private_key", "dsn", "passphrase")


class ConfigError(SystemExit):
    """Raised (and exits with ExitCode.CONFIG, 2) when the environment does not describe a valid configuration."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.CONFIG)
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe_errors(cls: type[BaseSettings], error: ValidationError) -> str:
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    lines = [f"invalid configuration for {cls.__name__}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "?"
        variable = prefix + field.upper()
        given = item.get("input")
        shown = "" if item["type"] == "missing" or isinstance(given, dict) else f" (got {given!r})"
        if any(word in field for word in SECRET_WORDS):
            shown = ""
        lines.append(f"  {variable}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build `cls` from the environment; on failure print which variables are wrong and exit with status 2."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        message = describe_errors(cls, error)
        print(message, file=sys.stderr)
        raise ConfigError(message) from None


def settings_from(cls: type[S], env: Mapping[str, str]) -> S:
    """`cls` from `env`, an environment other than the process's own (a child's, `LocalStack.env()` plus
    overrides): only the variables `cls` knows are read; a bad one is a ConfigError (exit 2) naming it."""
    fields = cls.model_fields
    try:
        return cls(**{key.lower(): value for key, value in env.items() if key.lower() in fields})
    except ValidationError as error:
        raise ConfigError(describe_errors(cls, error)) from None
