"""Service configuration from the environment, validated once at start.

Every service declares a `ServiceSettings` subclass; `load_settings` turns a missing or malformed variable into
one clear message naming the variable, and exits, instead of a stack trace half-way through start-up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.exits import ExitCode

# --- Validated value types --------------------------------------------------------------------------------
# Addresses are checked for their form at start, so a typo is one message naming the variable (exit 2) rather
# than a client waiting, retrying and dying later with a trace that names no variable. Whether something
# listens there is a different question, answered (with one line, see `DependencyUnavailable`) on connecting.

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def check_host(value: str) -> str:
    """`value` if it is an IP address (v4 or v6) or a DNS host name; ValueError otherwise."""
    host = value.strip()
    if not host:
        raise ValueError("empty host")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]") if host.startswith("[") else host)
        return host
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError("not an IP address or host name")
    if name.replace(".", "").isdigit():
        raise ValueError("not an IP address or host name")  # 300.1.2.3: digits that are no IPv4 address
    return host


def check_port(text: str, allow_zero: bool = False) -> int:
    if not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from {0 if allow_zero else 1} to 65535")
    return int(text)


def _split_host_port(entry: str) -> tuple[str, str]:
    if entry.startswith("["):  # [::1]:9092
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("not [IPv6]:port")
        return host, rest[1:]
    host, colon, port = entry.rpartition(":")
    if not colon:
        raise ValueError("no port")
    return host, port


def check_broker_list(value: str) -> str:
    """host:port[,host:port...] (the protocol is KAFKA_SECURITY_PROTOCOL's, not a prefix of an entry)."""
    expected = "expected host:port[,host:port...]"
    entries = [entry.strip() for entry in value.split(",")]
    if not value.strip() or not all(entries):
        raise ValueError(expected)
    for entry in entries:
        where = f"{entry!r}: " if len(entries) > 1 else ""
        try:
            host, port = _split_host_port(entry)
            check_host(host)
            check_port(port)
        except ValueError as error:
            raise ValueError(f"{where}{error} ({expected})") from None
    return ",".join(entries)


def check_http_url(value: str) -> str:
    """An http:// or https:// URL with a valid host (and port, when given)."""
    url = value.strip()
    expected = "expected http(s)://host[:port][/path]"
    if not url or any(ch.isspace() for ch in url):
        raise ValueError(f"not a URL ({expected}, no spaces)")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"its port is not a number from 1 to 65535 ({expected})") from None
    if port == 0:
        raise ValueError(f"its port is not a number from 1 to 65535 ({expected})")
    try:
        check_host(parts.hostname)
    except ValueError as error:
        raise ValueError(f"{error} ({expected})") from None
    return url


def check_dsn(value: SecretStr) -> SecretStr:
    """A PostgreSQL connection string libpq accepts: postgresql://... or key=value pairs. The message never
    quotes it (it may hold a password)."""
    from psycopg.conninfo import conninfo_to_dict

    text = value.get_secret_value().strip()
    if not text:
        raise ValueError("empty (expected postgresql://user@host:port/db or key=value pairs)")
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise ValueError("the URL form must start with postgresql:// (or postgres://)")
    try:
        parsed = conninfo_to_dict(text)
    except Exception:  # psycopg.ProgrammingError; its text may quote the string, so it is not shown
        raise ValueError(
            "not a PostgreSQL connection string (postgresql://user@host:port/db or key=value pairs)"
        ) from None
    for host in str(parsed.get("host") or "").split(","):
        if host and not host.startswith("/"):  # a unix socket folder is a path, not a host
            try:
                check_host(host)
            except ValueError:
                raise ValueError("its host is not an IP address or host name") from None
    for port in str(parsed.get("port") or "").split(","):
        if port:
            check_port(port)
    return value


BrokerList = Annotated[str, AfterValidator(check_broker_list)]
"""Kafka bootstrap servers: host:port[,host:port...]."""
OptionalBrokerList = Annotated[str, AfterValidator(lambda value: value and check_broker_list(value))]
"""The same, or empty where only some commands need Kafka."""
HttpUrl = Annotated[str, AfterValidator(check_http_url)]
"""An http(s) URL with a host (an S3 endpoint, a REST catalog, an OTLP endpoint, ...). A plain `str` after
validation, so clients get exactly what was configured."""
Host = Annotated[str, AfterValidator(check_host)]
"""A host to connect to: an IP address or a DNS name."""
BindHost = Annotated[str, AfterValidator(check_host)]
"""An interface to listen on: an IP address (0.0.0.0, ::, 127.0.0.1) or a name that resolves to one."""
Dsn = Annotated[SecretStr, AfterValidator(check_dsn)]
"""A PostgreSQL connection string, kept secret (it may hold a password)."""
Port = Annotated[int, Field(ge=1, le=65535)]
"""A TCP port to connect to."""
BindPort = Annotated[int, Field(ge=0, le=65535)]
"""A TCP port to listen on (0: any free one, logged at start)."""


class ServiceSettings(BaseSettings):
    """Settings every service shares. Field `x` is read from the environment variable `X`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    service_name: str = Field("lambda-pipeline", description="Name in logs, metrics and traces.")
    http_port: BindPort = Field(8080, description="Port of /healthz, /readyz and /metrics (0: any).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field("json", description="json for machines, text for a terminal.")
    kafka_bootstrap_servers: BrokerList = Field(..., description="host:port[,host:port...]")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    otel_exporter_otlp_endpoint: HttpUrl | None = Field(
        None, description="OTLP/HTTP endpoint of the trace backend (e.g. Grafana Tempo's :4318)."
    )
    otel_traces_file: str | None = Field(None, description="Write finished spans as JSON lines here (local).")
    otel_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    shutdown_timeout_s: float = Field(20.0, gt=0, description="Budget to flush and commit on SIGTERM.")
    dependency_wait_s: float = Field(
        30.0, gt=0, description="How long start-up waits for a dependency (broker, database, S3...) to answer."
    )


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


def _is_secret(cls: type[BaseSettings], field: str) -> bool:
    info = cls.model_fields.get(field)
    secret_type = info is not None and "SecretStr" in repr(info.annotation)
    return secret_type or any(word in field for word in SECRET_WORDS)


def _shown(value: object) -> str:
    """A value for an error message, with any user:password@ of a URL masked."""
    if not isinstance(value, str):
        return repr(value)
    return repr(re.sub(r"(://)[^/@\s]*@", r"\1***@", value))


def describe_errors(cls: type[BaseSettings], error: ValidationError) -> str:
    """One line per wrong variable: `  VARIABLE: what is wrong (got 'value')`, the value never for a secret."""
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    lines = [f"invalid configuration for {cls.__name__}:"]
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if not loc:  # a check across several variables: its message names them
            lines.append(f"  {message}")
            continue
        field = loc[0]
        given = item.get("input")
        unshown = item["type"] == "missing" or given is None or isinstance(given, dict)
        shown = "" if unshown else f" (got {_shown(given)})"
        if _is_secret(cls, field):
            shown = ""
        lines.append(f"  {prefix}{field.upper()}: {message}{shown}")
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
