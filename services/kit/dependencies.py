"""Waiting for a dependency at start, and saying in one line which one did not answer.

A service waits a bounded time (DEPENDENCY_WAIT_S) for what it needs: a broker, a database, S3, a warehouse.
When the time is up it fails with `DependencyUnavailable`, whose message names the variable that points there
and the address (never a password): `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9 unreachable after 30 s`. The
`Service` frame logs that as one line, without a trace: the address is the problem, not the code.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

T = TypeVar("T")


class DependencyUnavailable(ConnectionError):
    """A dependency did not answer within the start-up wait. `str()` is the one line to log."""

    def __init__(self, variable: str, address: str, waited_s: float, reason: str | None = None) -> None:
        self.variable, self.address, self.waited_s, self.reason = variable, address, waited_s, reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"{variable}={address} unreachable after {waited_s:.0f} s{detail}")


def url_address(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL (the scheme's port when none is given)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def url_shown(url: str) -> str:
    """A URL without its user:password@."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def dsn_address(dsn: str) -> tuple[str, int] | None:
    """(host, port) of a PostgreSQL connection string; None for a unix socket or libpq's defaults."""
    parsed = conninfo_to_dict(dsn)
    host = str(parsed.get("host") or "").split(",")[0]
    if not host or host.startswith("/"):
        return None
    return host, int(str(parsed.get("port") or "5432").split(",")[0])


def _reason(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return "host name not found"
    return error.strerror or type(error).__name__


def wait_for_tcp(variable: str, shown: str, addresses: Sequence[tuple[str, int]], timeout_s: float) -> None:
    """Return once one of `addresses` accepts a TCP connection; after `timeout_s` raise DependencyUnavailable
    naming `variable` and `shown` (the address as it may be shown: no password)."""

    def connect_any() -> None:
        last: OSError | None = None
        for host, port in addresses:
            try:
                socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))).close()
                return
            except OSError as error:
                last = error
        assert last is not None
        raise last

    retry_until(connect_any, variable, shown, timeout_s, retry_on=(OSError,))


def retry_until(
    attempt: Callable[[], T],
    variable: str,
    shown: str,
    timeout_s: float,
    retry_on: tuple[type[BaseException], ...],
    describe: Callable[[BaseException], str] | None = None,
    pause_s: float = 0.3,
) -> T:
    """`attempt()` again while it raises one of `retry_on`, for at most `timeout_s`; then DependencyUnavailable."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attempt()
        except retry_on as error:
            if time.monotonic() + pause_s >= deadline:
                reason = describe(error) if describe else _reason(error) if isinstance(error, OSError) else None
                raise DependencyUnavailable(variable, shown, timeout_s, reason) from None
            time.sleep(pause_s)
