"""The Snowflake loader's configuration, from the environment (docs/snowflake-loader.md has the table).

Credentials: exactly one of SNOWFLAKE_PASSWORD, SNOWFLAKE_PASSWORD_FILE or SNOWFLAKE_PRIVATE_KEY_FILE (key-pair
auth, PKCS#8 PEM, with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE if the key is encrypted). Secrets are `SecretStr` or
read from files when connecting, so they never appear in a repr, a log line or a configuration error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from services.archiver.settings import CatalogSettings

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]*$"
FAIL_POINTS = ("put", "copy", "merge")
TABLES = ("user_events", "transactions")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class SnowflakeSettings(CatalogSettings):
    """Where the warehouse is and how to log in (shared by the service, `run-once`, `migrate` and the bench)."""

    snowflake_account: str = Field(..., min_length=1, description="Account identifier (orgname-account).")
    snowflake_user: str = Field(..., min_length=1)
    snowflake_password: SecretStr | None = Field(None, description="Password auth (prefer the _FILE variant).")
    snowflake_password_file: Path | None = Field(None, description="File holding the password (a mounted Secret).")
    snowflake_private_key_file: Path | None = Field(None, description="Key-pair auth: PKCS#8 PEM private key file.")
    snowflake_private_key_passphrase_file: Path | None = Field(
        None, description="File holding the passphrase of an encrypted private key."
    )
    snowflake_host: str | None = Field(None, description="Unset for <account>.snowflakecomputing.com; local: fakesnow.")
    snowflake_port: int | None = Field(None, ge=1, le=65535)
    snowflake_protocol: Literal["https", "http"] = Field("https", description="http only for the local fakesnow.")
    snowflake_database: str = Field(..., pattern=IDENTIFIER, description="Database of every loader table.")
    snowflake_warehouse: str | None = Field(None, pattern=IDENTIFIER)
    snowflake_role: str | None = Field(None, pattern=IDENTIFIER)
    snowflake_create_database: bool = Field(
        False, description="`migrate` runs CREATE DATABASE IF NOT EXISTS (local; needs the privilege)."
    )
    snowflake_raw_schema: str = Field("RAW", pattern=IDENTIFIER)
    snowflake_staging_schema: str = Field("STAGING", pattern=IDENTIFIER)
    snowflake_marts_schema: str = Field("MARTS", pattern=IDENTIFIER)
    snowflake_control_schema: str = Field("CONTROL", pattern=IDENTIFIER, description="LOADS, PENDING, migrations.")
    snowflake_login_timeout_s: int = Field(60, ge=1)
    snowflake_network_timeout_s: int = Field(600, ge=1)

    @field_validator("snowflake_password_file", "snowflake_private_key_file", "snowflake_private_key_passphrase_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> SnowflakeSettings:
        given = [
            name
            for name, value in (
                ("SNOWFLAKE_PASSWORD", self.snowflake_password),
                ("SNOWFLAKE_PASSWORD_FILE", self.snowflake_password_file),
                ("SNOWFLAKE_PRIVATE_KEY_FILE", self.snowflake_private_key_file),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of SNOWFLAKE_PASSWORD, SNOWFLAKE_PASSWORD_FILE, SNOWFLAKE_PRIVATE_KEY_FILE "
                f"(found {', '.join(given) or 'none'})"
            )
        if self.snowflake_private_key_passphrase_file is not None and self.snowflake_private_key_file is None:
            raise ValueError("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE needs SNOWFLAKE_PRIVATE_KEY_FILE")
        if len({self.raw, self.staging, self.marts, self.control}) != 4:
            raise ValueError("SNOWFLAKE_{RAW,STAGING,MARTS,CONTROL}_SCHEMA must be four different schemas")
        return self

    @property
    def raw(self) -> str:
        return self.snowflake_raw_schema.upper()

    @property
    def staging(self) -> str:
        return self.snowflake_staging_schema.upper()

    @property
    def marts(self) -> str:
        return self.snowflake_marts_schema.upper()

    @property
    def control(self) -> str:
        return self.snowflake_control_schema.upper()

    @property
    def database(self) -> str:
        return self.snowflake_database.upper()


class LoaderSettings(SnowflakeSettings):
    """The service (`python -m services.snowflake_loader`): the lake, the warehouse and the loop."""

    service_name: str = "snowflake-loader"
    snowflake_loader_interval_s: float = Field(60.0, gt=0, description="Look for new snapshots this often.")
    snowflake_loader_tables: str = Field(",".join(TABLES), description="Lake tables to load (comma list).")
    snowflake_loader_file_rows: int = Field(
        500_000, ge=1, description="Rows per staged Parquet file (a batch may have several files)."
    )
    snowflake_loader_work_dir: Path | None = Field(
        None, description="Where batches are written as Parquet before PUT (default: a temporary folder)."
    )
    snowflake_loader_fail_after: Literal["put", "copy", "merge"] | None = Field(
        None,
        description="Tests only: exit the process (status 86) right after this step of the first batch, "
        "as a crash would (merge: after the MERGE statements, before COMMIT).",
    )

    @property
    def table_names(self) -> tuple[str, ...]:
        return _csv(self.snowflake_loader_tables)

    @field_validator("snowflake_loader_tables", mode="after")
    @classmethod
    def _known_tables(cls, value: str) -> str:
        names = _csv(value)
        unknown = set(names) - set(TABLES)
        if unknown or not names:
            raise ValueError(f"unknown table(s) {sorted(unknown)} or none given (user_events, transactions)")
        return value
