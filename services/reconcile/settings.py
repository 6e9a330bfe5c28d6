"""Configuration of the reconciliation (docs/reconciliation.md has the table), and how to read a day window.

Each store keeps its own settings class, read from the same environment the store's writer uses, so the command
needs no variable of its own to find a store: ClickHouse `ClickHouseSettings` (CLICKHOUSE_*), Iceberg
`CatalogSettings` (ICEBERG_*, S3_*, AWS_*), Snowflake `SnowflakeSettings` below (SNOWFLAKE_*).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.config import ConfigError, describe_errors

STORES = ("clickhouse", "iceberg", "snowflake")
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$"

S = TypeVar("S", bound=BaseSettings)


def settings_from(cls: type[S], env: Mapping[str, str]) -> S:
    """`cls` from `env` (variables the class knows), or a ConfigError (exit 2) naming the bad variables."""
    fields = cls.model_fields
    try:
        return cls(**{key.lower(): value for key, value in env.items() if key.lower() in fields})
    except ValidationError as error:
        raise ConfigError(describe_errors(cls, error)) from None


def parse_stores(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    unknown = [name for name in names if name not in STORES]
    if unknown:
        raise ValueError(f"unknown store(s) {unknown}; choose from {', '.join(STORES)}")
    if len(names) < 2:
        raise ValueError(f"name at least two stores to compare (got {', '.join(names) or 'none'})")
    return names


_RELATIVE = re.compile(r"^-(\d+)d$")


def parse_day(text: str, today: date | None = None) -> date:
    """A UTC day: YYYY-MM-DD, `today`, `yesterday` or `-Nd` (N days before today)."""
    today = today or datetime.now(UTC).date()
    value = text.strip().lower()
    if value == "today":
        return today
    if value == "yesterday":
        return today - timedelta(days=1)
    relative = _RELATIVE.match(value)
    if relative:
        return today - timedelta(days=int(relative.group(1)))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a day (YYYY-MM-DD, today, yesterday or -Nd)") from None


class ReconcileSettings(BaseSettings):
    """The comparison itself: which stores, the tolerance, the window and where the metrics go."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    reconcile_stores: str = Field(",".join(STORES), description="Stores to compare (at least two), comma list.")
    reconcile_min_consistency: float = Field(
        0.999, gt=0, le=1, description="Exit 1 below this consistency (0.999 = 99.9 %)."
    )
    reconcile_revenue_tolerance: float = Field(
        1e-6, ge=0, lt=1, description="Relative difference under which a cell's revenues count as equal."
    )
    reconcile_since: str | None = Field(None, description="First UTC day of event time compared (default: all).")
    reconcile_until: str | None = Field(None, description="Last UTC day of event time compared, inclusive.")
    reconcile_metrics_file: Path | None = Field(None, description="Write the metrics here (Prometheus text format).")
    reconcile_pushgateway_url: str | None = Field(None, description="Also push the metrics to this Pushgateway.")
    reconcile_pushgateway_job: str = Field("lp-reconcile", min_length=1, description="Pushgateway job name.")
    reconcile_iceberg_table: str = Field("user_events", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    reconcile_snowflake_table: str = Field(
        "STAGING.EVENTS_CLEANED", pattern=_IDENTIFIER, description="[SCHEMA.]TABLE in SNOWFLAKE_DATABASE."
    )

    @field_validator("reconcile_stores")
    @classmethod
    def _stores(cls, value: str) -> str:
        parse_stores(value)
        return value

    @field_validator("reconcile_since", "reconcile_until")
    @classmethod
    def _day(cls, value: str | None) -> str | None:
        if value:
            parse_day(value)
        return value or None

    @property
    def stores(self) -> tuple[str, ...]:
        return parse_stores(self.reconcile_stores)


class SnowflakeSettings(BaseSettings):
    """Where Snowflake is (the real connector; locally the fakesnow server over http)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    snowflake_account: str = Field(..., min_length=1)
    snowflake_user: str = Field(..., min_length=1)
    snowflake_password: SecretStr | None = Field(None, description="Password auth (or SNOWFLAKE_PASSWORD_FILE).")
    snowflake_password_file: Path | None = Field(None, description="File holding the password (a mounted secret).")
    snowflake_private_key_file: Path | None = Field(None, description="Key-pair auth: PEM private key file.")
    snowflake_private_key_passphrase_file: Path | None = Field(None, description="Passphrase of that key, if any.")
    snowflake_host: str | None = Field(None, description="Unset for Snowflake itself; the emulator's host locally.")
    snowflake_port: int | None = Field(None, ge=1, le=65535)
    snowflake_protocol: Literal["https", "http"] = "https"
    snowflake_database: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_$]*$")
    snowflake_warehouse: str | None = None
    snowflake_role: str | None = None
    snowflake_login_timeout_s: float = Field(20.0, gt=0)

    @model_validator(mode="after")
    def _credentials(self) -> SnowflakeSettings:
        if not (self.snowflake_password or self.snowflake_password_file or self.snowflake_private_key_file):
            raise ValueError(
                "no credentials: set SNOWFLAKE_PASSWORD, SNOWFLAKE_PASSWORD_FILE or SNOWFLAKE_PRIVATE_KEY_FILE"
            )
        for path in (
            self.snowflake_password_file,
            self.snowflake_private_key_file,
            self.snowflake_private_key_passphrase_file,
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        return self

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `snowflake.connector.connect` (secrets read here, never logged)."""
        kwargs: dict[str, Any] = {
            "account": self.snowflake_account,
            "user": self.snowflake_user,
            "database": self.snowflake_database,
            "protocol": self.snowflake_protocol,
            "login_timeout": self.snowflake_login_timeout_s,
            "network_timeout": 4 * self.snowflake_login_timeout_s,
        }
        if self.snowflake_private_key_file is not None:
            kwargs["private_key_file"] = str(self.snowflake_private_key_file)
            if self.snowflake_private_key_passphrase_file is not None:
                kwargs["private_key_file_pwd"] = self.snowflake_private_key_passphrase_file.read_text().strip()
        elif self.snowflake_password_file is not None:
            kwargs["password"] = self.snowflake_password_file.read_text().strip()
        elif self.snowflake_password is not None:
            kwargs["password"] = self.snowflake_password.get_secret_value()
        for key, value in (
            ("host", self.snowflake_host),
            ("port", self.snowflake_port),
            ("warehouse", self.snowflake_warehouse),
            ("role", self.snowflake_role),
        ):
            if value is not None:
                kwargs[key] = value
        return kwargs
