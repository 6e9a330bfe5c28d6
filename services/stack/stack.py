"""LocalStack: start, check and stop all embedded stand-ins as one unit.

Typical in-process use (tests, `make run`)::

    from services.stack import LocalStack, StackSettings

    with LocalStack(StackSettings()) as stack:   # starts and waits until every component answers
        os.environ.update(stack.env())           # KAFKA_BOOTSTRAP_SERVERS, POSTGRES_DSN, ...
        ...
    # everything is stopped here, also on exceptions, Ctrl+C, SIGTERM and interpreter exit

Detached use (`python -m services.stack up` / `down`): ``start(detach=True)`` leaves the processes running
after the Python process exits; ``LocalStack.from_state(state_dir)`` re-attaches to them via
``<state>/stack.json`` to report status or stop them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from services.kit.exits import killed_by
from services.stack.components import (
    Component,
    ComponentError,
    FakeSnowflake,
    KafkaBroker,
    Postgres,
    SeaweedS3,
    WaitCancelled,
    process_alive,
    process_create_time,
)
from services.stack.prometheus import Prometheus
from services.stack.settings import HOST, StackSettings

STATE_FILE = "stack.json"
STATE_VERSION = 1


class StackError(RuntimeError):
    """The stack as a whole cannot do what was asked (e.g. it is already running)."""


class StackAlreadyRunning(StackError):
    pass


class LocalStack:
    """The four stand-ins (broker, postgres, s3, snowflake) and Prometheus (when installed) under one state dir.

    Endpoint attributes (``bootstrap_servers``, ``postgres_dsn``, ``s3_endpoint``, ...) are known from the
    settings alone, before or after start.
    """

    COMPONENT_NAMES: tuple[str, ...] = ("broker", "postgres", "s3", "snowflake", "prometheus")

    def __init__(self, settings: StackSettings | None = None, only: Iterable[str] | None = None) -> None:
        """``only``: run just these components (names from COMPONENT_NAMES), e.g. ``["broker"]``."""
        self.settings = settings or StackSettings()
        self.broker = KafkaBroker(self.settings)
        self.postgres = Postgres(self.settings)
        self.s3 = SeaweedS3(self.settings)
        self.snowflake = FakeSnowflake(self.settings)
        self.prometheus = Prometheus(self.settings)
        wanted = set(self.COMPONENT_NAMES if only is None else only)
        unknown = wanted - set(self.COMPONENT_NAMES)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {self.COMPONENT_NAMES}")
        # Why a wanted component is left out (printed by `up` and `make run`).
        self.skipped: dict[str, str] = {}
        if "prometheus" in wanted and Prometheus.binary() is None:
            wanted.discard("prometheus")
            self.skipped["prometheus"] = (
                "not started: no prometheus binary on PATH (`make up`/`make run` install Debian's package as root; "
                "else: sudo apt-get install prometheus)"
            )
        # Start order; stop goes in reverse.
        self.components: list[Component] = [
            comp
            for comp in (self.broker, self.postgres, self.s3, self.snowflake, self.prometheus)
            if comp.name in wanted
        ]
        self.started_at: str | None = None
        self.detached = False
        self._lock = threading.RLock()
        self._atexit_registered = False
        self._saved_handlers: dict[int, Any] = {}
        # Set by from_state(): the process that started an in-process stack (to spot orphans).
        self._owner: tuple[int, float | None] | None = None
        # stop() removes stack.json only if it describes this instance's processes.
        self._owns_state_file = False

    # -- endpoints ----------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers

    @property
    def postgres_dsn(self) -> str:
        return self.postgres.dsn

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint_url

    @property
    def s3_bucket(self) -> str:
        return self.settings.s3_bucket

    @property
    def aws_access_key_id(self) -> str:
        return self.settings.aws_access_key_id

    @property
    def aws_secret_access_key(self) -> str:
        return self.settings.aws_secret_access_key

    @property
    def aws_region(self) -> str:
        return self.settings.aws_region

    @property
    def iceberg_rest_uri(self) -> str:
        return self.s3.iceberg_rest_uri

    @property
    def snowflake_account(self) -> str:
        return self.settings.snowflake_account

    @property
    def snowflake_user(self) -> str:
        return self.settings.snowflake_user

    @property
    def snowflake_password(self) -> str:
        return self.settings.snowflake_password

    @property
    def snowflake_host(self) -> str:
        return HOST

    @property
    def snowflake_port(self) -> int:
        return self.settings.snowflake_port

    @property
    def snowflake_protocol(self) -> str:
        return "http"

    @property
    def snowflake_database(self) -> str:
        return self.settings.snowflake_database

    @property
    def prometheus_running(self) -> bool:
        """Whether this stack runs Prometheus (its binary is installed and it was not left out)."""
        return self.prometheus in self.components

    def snowflake_connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``snowflake.connector.connect(**kwargs)``."""
        return self.snowflake.connect_kwargs()

    def s3_client(self) -> Any:
        """A boto3 S3 client for the local endpoint."""
        return self.s3.client()

    def env(self) -> dict[str, str]:
        """The environment variables the platform's services read to find the stack."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "POSTGRES_DSN": self.postgres_dsn,
            "S3_ENDPOINT_URL": self.s3_endpoint,
            "S3_BUCKET": self.s3_bucket,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_REGION": self.aws_region,
            "ICEBERG_REST_URI": self.iceberg_rest_uri,
            "SNOWFLAKE_ACCOUNT": self.snowflake_account,
            "SNOWFLAKE_USER": self.snowflake_user,
            "SNOWFLAKE_PASSWORD": self.snowflake_password,
            "SNOWFLAKE_HOST": self.snowflake_host,
            "SNOWFLAKE_PORT": str(self.snowflake_port),
            "SNOWFLAKE_PROTOCOL": self.snowflake_protocol,
            "SNOWFLAKE_DATABASE": self.snowflake_database,
        }

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, *, detach: bool = False, timeout: float | None = None) -> LocalStack:
        """Start every component and wait until each answers a real client request.

        ``detach=False`` (default): the processes belong to this Python process and are stopped at exit,
        on SIGTERM/SIGINT, or by ``stop()``/the context manager. ``detach=True``: they outlive it; stop
        them with ``stop()`` here or ``LocalStack.from_state(...).stop()`` / ``python -m services.stack down``
        elsewhere. Raises StackAlreadyRunning if ``stack.json`` names a live stack, ComponentError if a
        component fails (after stopping whatever was started).
        """
        with self._lock:
            self._clear_stale_state()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.detached = detach
            if not detach:
                self._install_exit_hooks()
            try:
                # A postgres left on our data dir without a stack.json would hold the port.
                if self.postgres in self.components:
                    self.postgres.stop_orphan()
                # Fail before launching anything if a port is taken.
                for comp in self.components:
                    comp.check_ports()
                # The external processes boot in the background while postgres (initdb + pg_ctl -w)
                # blocks this thread; readiness is then awaited in start order.
                for comp in self.components:
                    if comp is not self.postgres:
                        comp.start()
                if self.postgres in self.components:
                    self.postgres.start()
                self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
                self._write_state()
                self._wait_all_ready(timeout)
                self._write_state()
            except BaseException:
                self.stop()
                raise
        return self

    def _wait_all_ready(self, timeout: float | None) -> None:
        # Probes run in parallel (their client imports alone take a second or two); after the first failure
        # the others give up, and the error reported is the first failing component in start order.
        cancel = threading.Event()
        with ThreadPoolExecutor(max_workers=len(self.components) or 1, thread_name_prefix="lp-ready") as pool:
            futures = [pool.submit(comp.wait_ready, timeout, cancel) for comp in self.components]
            wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in futures):
                cancel.set()
        for future in futures:
            exc = future.exception()
            if exc is not None and not isinstance(exc, WaitCancelled):
                raise exc

    def stop(self) -> None:
        """Stop every component (reverse order, shutdowns overlapping) and remove stack.json. Idempotent."""
        with self._lock:
            errors: list[str] = []
            for comp in reversed(self.components):
                try:
                    comp.request_stop()
                except Exception as exc:
                    errors.append(f"{comp.name}: {exc}")
            for comp in reversed(self.components):
                try:
                    comp.wait_stopped()
                except Exception as exc:
                    errors.append(f"{comp.name}: {exc}")
            if self._owns_state_file:
                self.state_file.unlink(missing_ok=True)
                self._owns_state_file = False
            self._remove_exit_hooks()
            if errors:
                raise StackError("errors while stopping: " + "; ".join(errors))

    def check(self) -> None:
        """Raise ComponentError naming the first component whose process is gone (with its log tail)."""
        dead = [comp for comp in self.components if not comp.is_running()]
        if dead:
            names = ", ".join(comp.name for comp in dead)
            first = dead[0]
            raise first.error(f"process is not running (dead components: {names})")

    def is_running(self) -> bool:
        """True if every component process is alive."""
        return all(comp.is_running() for comp in self.components)

    def health(self) -> dict[str, str | None]:
        """Per component: None if it answers a client request now, else the error text."""
        result: dict[str, str | None] = {}
        for comp in self.components:
            if not comp.is_running():
                result[comp.name] = "process is not running"
                continue
            try:
                comp.probe()
                result[comp.name] = None
            except Exception as exc:
                result[comp.name] = f"{type(exc).__name__}: {exc}"
        return result

    def status(self) -> list[dict[str, Any]]:
        """One row per component: name, running, pid, port, log."""
        return [
            {
                "name": comp.name,
                "running": comp.is_running(),
                "pid": comp.pid,
                "port": comp.port,
                "log": str(comp.log_path),
            }
            for comp in self.components
        ]

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- state file -----------------------------------------------------------------------------------

    def _write_state(self) -> None:
        data = {
            "version": STATE_VERSION,
            "started_at": self.started_at,
            "owner_pid": os.getpid(),
            "owner_create_time": process_create_time(os.getpid()),
            "detached": self.detached,
            "state_dir": str(self.state_dir),
            "log_dir": str(self.log_dir),
            "settings": self.settings.model_dump(mode="json"),
            "env": self.env(),
            "components": {comp.name: comp.record() for comp in self.components},
        }
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)
        self._owns_state_file = True

    @staticmethod
    def read_state(state_dir: Path | str) -> dict[str, Any] | None:
        """The parsed stack.json under ``state_dir`` (None if absent or unreadable)."""
        path = Path(state_dir) / STATE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    @classmethod
    def from_state(cls, state_dir: Path | str) -> LocalStack | None:
        """Re-attach to the stack recorded in ``<state_dir>/stack.json`` (None if there is none)."""
        data = cls.read_state(state_dir)
        if data is None:
            return None
        settings = StackSettings(**{**data.get("settings", {}), "state_dir": Path(state_dir)})
        records = data.get("components", {})
        stack = cls(settings, only=[name for name in cls.COMPONENT_NAMES if name in records])
        if "prometheus" in records and not stack.prometheus_running:  # binary gone since: still stop its process
            stack.components.append(stack.prometheus)
            stack.skipped.pop("prometheus", None)
        stack.started_at = data.get("started_at")
        stack.detached = bool(data.get("detached"))
        stack._owns_state_file = True
        for comp in stack.components:
            if comp.name in records:
                comp.attach(records[comp.name])
        if data.get("owner_pid"):
            stack._owner = (int(data["owner_pid"]), data.get("owner_create_time"))
        return stack

    @property
    def owner_pid(self) -> int | None:
        """The Python process that started this stack (as recorded in stack.json; None if not attached)."""
        return self._owner[0] if self._owner else None

    def is_orphaned(self) -> bool:
        """True for an in-process (non-detached) stack whose owning Python process is gone."""
        return not self.detached and self._owner is not None and not process_alive(*self._owner)

    def _clear_stale_state(self) -> None:
        """Clean up after an earlier stack that died or lost its owner; refuse if one is still live."""
        previous = LocalStack.from_state(self.state_dir)
        if previous is None:
            return
        alive = [comp.name for comp in previous.components if comp.is_running()]
        if alive and not previous.is_orphaned():
            raise StackAlreadyRunning(
                f"a local stack is already running from {self.state_file} (components up: "
                f"{', '.join(alive)}); stop it with `python -m services.stack down`"
            )
        # Dead or orphaned: stop whatever is left of it so its ports and data dirs are free again.
        previous.stop()

    # -- exit hooks (in-process mode) -----------------------------------------------------------------

    def _install_exit_hooks(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still covers us
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            current = signal.getsignal(sig)
            # Leave a handler the application installed alone; it must end in an exception or exit.
            if sig == signal.SIGINT and current is not signal.default_int_handler:
                continue
            if sig != signal.SIGINT and current not in (signal.SIG_DFL, None):
                continue
            self._saved_handlers[sig] = current
            signal.signal(sig, self._on_signal)

    def _remove_exit_hooks(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._saved_handlers.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
        self._saved_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Stopping here, then unwinding as usual: `with` blocks and finally clauses see an exception, and a
        # second stop() from them is a no-op.
        self.stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(killed_by(signum))

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


@contextlib.contextmanager
def local_stack(settings: StackSettings | None = None, timeout: float | None = None) -> Iterator[LocalStack]:
    """``with local_stack() as stack:`` — start (in-process), yield, always stop."""
    stack = LocalStack(settings)
    stack.start(timeout=timeout)
    try:
        yield stack
    finally:
        stack.stop()


__all__ = [
    "ComponentError",
    "LocalStack",
    "StackAlreadyRunning",
    "StackError",
    "local_stack",
]
