"""Snowflake: where the warehouse is, how to log in, and a connection (snowflake-connector-python).

Credentials: exactly one of SNOWFLAKE_PASSWORD, SNOWFLAKE_PASSWORD_FILE or SNOWFLAKE_PRIVATE_KEY_FILE (key-pair
auth, PKCS#8 PEM, with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE if the key is encrypted). Secrets are `SecretStr` or
read from files at connect time, so they never appear in a repr, a log line or a configuration error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.config import Host, Port
from services.kit.dependencies import wait_for_tcp
from services.kit.health import Health
from services.kit.reconnect import Backoff, one_line, reconnect

log = logging.getLogger(__name__)

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]*$"


class SnowflakeSettings(BaseSettings):
    """Where the warehouse is and how to log in (the loader, the reconciliation, the bench)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    snowflake_account: str = Field(..., min_length=1, description="Account identifier (orgname-account).")
    snowflake_user: str = Field(..., min_length=1)
    snowflake_password: SecretStr | None = Field(None, description="Password auth (prefer the _FILE variant).")
    snowflake_password_file: Path | None = Field(None, description="File holding the password (a mounted Secret).")
    snowflake_private_key_file: Path | None = Field(None, description="Key-pair auth: PKCS#8 PEM private key file.")
    snowflake_private_key_passphrase_file: Path | None = Field(
        None, description="File holding the passphrase of an encrypted private key."
    )
    snowflake_host: Host | None = Field(
        None, description="Unset for <account>.snowflakecomputing.com; local: fakesnow."
    )
    snowflake_port: Port | None = None
    snowflake_protocol: Literal["https", "http"] = Field("https", description="http only for the local fakesnow.")
    snowflake_database: str = Field(..., pattern=IDENTIFIER, description="Database of every lambda-pipeline table.")
    snowflake_warehouse: str | None = Field(None, pattern=IDENTIFIER)
    snowflake_role: str | None = Field(None, pattern=IDENTIFIER)
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
        return self

    @property
    def database(self) -> str:
        return self.snowflake_database.upper()


class CredentialError(ValueError):
    """A credential file that cannot be used (the message names the variable, never the secret)."""


def _read_secret(path: Any, variable: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise CredentialError(f"{variable}: cannot read {path}: {error.strerror}") from None
    if not text:
        raise CredentialError(f"{variable}: {path} is empty")
    return text


def private_key_der(settings: SnowflakeSettings) -> bytes:
    """The private key of SNOWFLAKE_PRIVATE_KEY_FILE as unencrypted PKCS#8 DER (what the connector takes)."""
    from cryptography.hazmat.primitives import serialization

    assert settings.snowflake_private_key_file is not None
    passphrase = None
    if settings.snowflake_private_key_passphrase_file is not None:
        passphrase = _read_secret(
            settings.snowflake_private_key_passphrase_file, "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE"
        ).encode()
    try:
        key = serialization.load_pem_private_key(settings.snowflake_private_key_file.read_bytes(), password=passphrase)
    except (ValueError, TypeError) as error:  # wrong passphrase, not a PEM key, encrypted without a passphrase
        raise CredentialError(
            f"SNOWFLAKE_PRIVATE_KEY_FILE: cannot load the key ({type(error).__name__}; check the file and "
            "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE)"
        ) from None
    return key.private_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def connect_kwargs(settings: SnowflakeSettings) -> dict[str, Any]:
    """Keyword arguments for `snowflake.connector.connect` (holds the secret: never log it)."""
    kwargs: dict[str, Any] = {
        "account": settings.snowflake_account,
        "user": settings.snowflake_user,
        "database": settings.database,
        "protocol": settings.snowflake_protocol,
        "login_timeout": settings.snowflake_login_timeout_s,
        "network_timeout": settings.snowflake_network_timeout_s,
        "application": "lambda-pipeline-snowflake-loader",
        # Explicit BEGIN/COMMIT only; everything else commits on its own, as in a fresh Snowflake session.
        "autocommit": True,
    }
    for key, value in (
        ("host", settings.snowflake_host),
        ("port", settings.snowflake_port),
        ("warehouse", settings.snowflake_warehouse),
        ("role", settings.snowflake_role),
    ):
        if value is not None:
            kwargs[key] = value
    if settings.snowflake_password is not None:
        kwargs["password"] = settings.snowflake_password.get_secret_value()
    elif settings.snowflake_password_file is not None:
        kwargs["password"] = _read_secret(settings.snowflake_password_file, "SNOWFLAKE_PASSWORD_FILE")
    else:
        kwargs["authenticator"] = "SNOWFLAKE_JWT"
        kwargs["private_key"] = private_key_der(settings)
    return kwargs


def quiet_connector() -> None:
    """The connector logs every request at INFO, each network retry as a warning and each failed request as an
    error with a traceback, and warns about the (newer) pyarrow on import. Its failures reach us as exceptions,
    which the callers log in one line: keep the connector to critical messages, unless LOG_LEVEL=DEBUG asks for
    everything (its own secret masking applies then). Its background threads (a query's cancel timer) that fail
    on a lost warehouse are one warning line too, not a traceback on stderr."""
    warnings.filterwarnings("ignore", message=".*incompatible version of 'pyarrow'.*")
    debug = logging.getLogger().level <= logging.DEBUG
    for name in ("snowflake.connector", "snowflake"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if not debug and not getattr(threading.excepthook, "quiets_snowflake", False):
        threading.excepthook = _quiet_connector_threads(threading.excepthook)


def wait_for_warehouse(settings: SnowflakeSettings, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) until Snowflake's host accepts connections; else one DependencyUnavailable
    naming SNOWFLAKE_HOST (or SNOWFLAKE_ACCOUNT, whose host it is when SNOWFLAKE_HOST is unset)."""
    port = settings.snowflake_port or (443 if settings.snowflake_protocol == "https" else 80)
    if settings.snowflake_host:
        variable, host = "SNOWFLAKE_HOST", settings.snowflake_host
    else:
        variable, host = "SNOWFLAKE_ACCOUNT", f"{settings.snowflake_account}.snowflakecomputing.com"
    wait_for_tcp(variable, f"{host}:{port}", [(host, port)], timeout_s)


def _quiet_connector_threads(
    previous: Callable[[threading.ExceptHookArgs], Any],
) -> Callable[[threading.ExceptHookArgs], Any]:
    def hook(args: threading.ExceptHookArgs) -> Any:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if args.exc_value is not None and any("snowflake/connector" in frame.filename for frame in frames):
            name = getattr(args.thread, "name", "?")
            log.warning("snowflake connector thread %s: %s", name, one_line(args.exc_value))
            return None
        return previous(args)

    hook.quiets_snowflake = True  # type: ignore[attr-defined]
    return hook


def connect(settings: SnowflakeSettings, timeout_s: int | None = None) -> Any:
    """An open connection with the database (and warehouse, role) selected. `timeout_s` replaces the login and
    network timeouts (a probe must not wait SNOWFLAKE_NETWORK_TIMEOUT_S for a hung warehouse)."""
    quiet_connector()
    import snowflake.connector

    kwargs = connect_kwargs(settings)
    if timeout_s is not None:
        kwargs |= {"login_timeout": timeout_s, "network_timeout": timeout_s}
    conn = snowflake.connector.connect(**kwargs)
    log.info(
        "connected to Snowflake account %s as %s (database %s)",
        settings.snowflake_account,
        settings.snowflake_user,
        settings.database,
        extra={"snowflake_host": settings.snowflake_host or "snowflakecomputing.com"},
    )
    return conn


RECONNECT_BACKOFF = Backoff(initial_s=1.0, max_s=30.0)


class Warehouse:
    """A thin wrapper around one connection: execute, query, explicit transactions; and, when it knows how to
    open a new one (`Warehouse.open`), `heal()` after a failure: a session the server no longer knows (it
    restarted: every request then fails with 401; the token expired; the connection dropped) is replaced."""

    def __init__(self, conn: Any, reopen: Callable[[], Any] | None = None) -> None:
        self.conn = conn
        self.cursor = conn.cursor()
        self._reopen = reopen
        # Run on every new session after the first (`heal`): what a session must have set up (schema, stage).
        self.on_reconnect: list[Callable[[Warehouse], None]] = []

    @classmethod
    def open(cls, settings: SnowflakeSettings) -> Warehouse:
        return cls(connect(settings), reopen=lambda: connect(settings))

    def heal(
        self,
        *,
        health: Health | None = None,
        stopping: threading.Event | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
    ) -> bool:
        """After a failed statement: True when the session was lost and a new one is open (with the
        `on_reconnect` set-up done), False when the session still answers (the failure was something else).
        Retries with backoff until a session opens or `stopping` is set (`ReconnectAborted`)."""
        if self._reopen is None:
            raise RuntimeError("this Warehouse was not opened with Warehouse.open: it cannot reconnect")
        try:
            self.query("SELECT 1")
            return False
        except Exception as error:
            log.warning("snowflake: the session does not answer (%s): opening a new one", one_line(error))
        self._drop()
        reconnect(self._new_session, "snowflake", log=log, health=health, stopping=stopping, backoff=backoff)
        return True

    def _new_session(self) -> Warehouse:
        assert self._reopen is not None
        self.conn = self._reopen()
        self.cursor = self.conn.cursor()
        try:
            for set_up in self.on_reconnect:
                set_up(self)
        except Exception:
            self._drop()
            raise
        return self

    def _drop(self) -> None:
        """Close the current session, ignoring what a lost session answers (the server may not know it)."""
        with contextlib.suppress(Exception):
            self.close()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.cursor.execute(sql, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        self.cursor.execute(sql, params)
        return list(self.cursor.fetchall())

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT; ROLLBACK on any error (the error is raised again)."""
        self.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            try:
                self.execute("ROLLBACK")
            except Exception as error:  # the session may be gone: Snowflake aborts its transaction then
                log.warning("rollback failed: %s", error)
            raise
        self.execute("COMMIT")

    def close(self) -> None:
        try:
            self.cursor.close()
        finally:
            self.conn.close()


class WarehouseProbe:
    """A readiness check: `SELECT 1` on a session of its own (the loader's may be busy loading), opened with
    `timeout_s` as login and network timeouts; after a failure the next probe opens a new session."""

    def __init__(self, settings: SnowflakeSettings, timeout_s: int = 30) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._warehouse: Warehouse | None = None

    def __call__(self) -> str | None:
        try:
            if self._warehouse is None:
                self._warehouse = Warehouse(connect(self.settings, timeout_s=self.timeout_s))
            self._warehouse.scalar("SELECT 1")
            return None
        except Exception as error:
            self.close()
            return one_line(error)

    def close(self) -> None:
        warehouse, self._warehouse = self._warehouse, None
        if warehouse is not None:
            with contextlib.suppress(Exception):
                warehouse.close()


@contextmanager
def open_warehouse(settings: SnowflakeSettings) -> Iterator[Warehouse]:
    warehouse = Warehouse(connect(settings))
    try:
        yield warehouse
    finally:
        warehouse.close()
