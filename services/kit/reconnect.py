"""Reopening a lost session to a store: exponential backoff with jitter, one log line per attempt.

A client that finds its session gone (the server restarted, the token expired, the connection dropped) calls
`reconnect(open_session, name, ...)`: it tries to open a new session until one opens, waiting
`Backoff.delay(attempt)` between tries (exponential, with jitter so that many clients do not retry in step).
Each failed attempt is ONE warning line naming the dependency, the attempt and the error's first line (no
traceback). While it tries, the dependency is marked down in the service's `Health` (so /readyz is 503, and
/healthz fails once that lasts longer than HEALTH_PROGRESS_BUDGET_S) and the main loop's heartbeat keeps
turning (the loop is waiting, not stuck).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from services.kit.health import Health

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential with "equal jitter": between half and all of min(max, initial * 2^(attempt-1))."""
        ceiling = min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class ReconnectAborted(RuntimeError):
    """The service is stopping (or the attempts ran out) before a session could be opened."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: what a log line or /readyz shows."""
    text = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


def reconnect(
    open_session: Callable[[], T],
    name: str,
    *,
    log: logging.Logger,
    health: Health | None = None,
    stopping: threading.Event | None = None,
    backoff: Backoff = Backoff(),  # frozen: a shared default is safe
    max_attempts: int | None = None,
    rng: random.Random | None = None,
) -> T:
    """`open_session()` until it succeeds; raises ReconnectAborted when `stopping` is set or after
    `max_attempts` failures (None: keep trying; liveness ends a wait longer than the progress budget)."""
    stopping = stopping or threading.Event()
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            session = open_session()
        except Exception as error:
            reason = one_line(error)
            if health is not None:
                health.dependency_down(name, reason)
            if max_attempts is not None and attempt >= max_attempts:
                log.error("%s: reconnect attempt %d failed (%s); giving up", name, attempt, reason)
                raise ReconnectAborted(f"{name}: no session after {attempt} attempts: {reason}") from None
            delay = backoff.delay(attempt, rng)
            log.warning(
                "%s: reconnect attempt %d failed (%s); next in %.1fs",
                name, attempt, reason, delay,
                extra={"dependency": name, "attempt": attempt, "retry_in_s": round(delay, 3)},
            )  # fmt: skip
            waited = 0.0
            while waited < delay:  # beat while waiting: the loop is alive, the dependency is not
                if health is not None:
                    health.beat()
                step = min(1.0, delay - waited)
                if stopping.wait(step):
                    raise ReconnectAborted(f"{name}: stopping before a session could be opened") from None
                waited += step
            continue
        if health is not None:
            health.dependency_up(name)
            health.beat()
        if attempt > 1:
            log.info(
                "%s: reconnected after %d attempts in %.1fs",
                name, attempt, time.monotonic() - started,
                extra={"dependency": name, "attempt": attempt},
            )  # fmt: skip
        return session
