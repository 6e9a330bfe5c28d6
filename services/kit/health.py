"""`/healthz`, `/readyz` and `/metrics` over HTTP, served from a daemon thread.

Readiness: the service started, is not shutting down, no dependency is marked down, and every readiness check
answers "fine" within HEALTH_PROBE_TIMEOUT_S. A check runs in its own thread, so a dependency that hangs turns
/readyz to 503 after the probe timeout instead of hanging the probe (a hung check is not started again until
it returns: probes never pile up threads).

Liveness: the service makes progress. It fails when the main loop has not turned (`beat`) for
HEALTH_PROGRESS_BUDGET_S, or when a readiness check has been failing (a dependency down, hung or refusing)
continuously for that long: then a restart is the better bet, and Kubernetes restarts it. Starting,
rebalancing and shutting down are not dependency failures (a start that hangs stops the beat; the shutdown
watchdog bounds the rest). Liveness evaluates the readiness checks itself, so /healthz alone is enough.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ReadinessCheck = Callable[[], str | None]  # returns None when fine, else why not ready


class HealthSettings(BaseSettings):
    """The health budgets every service shares (read by `Service`; docs/configuration.md)."""

    model_config = SettingsConfigDict(env_prefix="health_", case_sensitive=False, extra="ignore")

    progress_budget_s: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when the main loop is stuck, or the service not ready, for this long.",
    )
    probe_timeout_s: float = Field(
        2.0, gt=0, description="A readiness check that has not answered in this time counts as failing (hung)."
    )


class _BoundedCheck:
    """One readiness check, run in a thread of its own so that a hung dependency cannot hang the probe."""

    def __init__(self, name: str, check: ReadinessCheck, clock: Callable[[], float]) -> None:
        self.name, self.check, self.clock = name, check, clock
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._result: str | None = None
        self._started = 0.0

    def begin(self) -> None:
        """Start a run unless one is still in flight (a hung one is waited for, never duplicated)."""
        with self._lock:
            if not self._done.is_set():
                return
            done = self._done = threading.Event()
            self._started = self.clock()
        threading.Thread(target=self._run, args=(done,), name=f"readiness-{self.name}", daemon=True).start()

    def _run(self, done: threading.Event) -> None:
        try:
            result = self.check()
        except Exception as error:  # a failing check is "not ready", never a crash of the server
            result = f"{type(error).__name__}: {error}"
        self._result = result
        done.set()

    def outcome(self, deadline: float, timeout_s: float) -> str | None:
        if self._done.wait(max(0.0, deadline - self.clock())):
            return self._result
        return f"no answer within {timeout_s:g}s (waiting for {self.clock() - self._started:.1f}s)"


class Health:
    def __init__(
        self,
        progress_budget_s: float = 120.0,
        probe_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.progress_budget_s = progress_budget_s
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        self._last_beat = clock()
        self._ready = False
        self._reason = "starting"
        self._checks: dict[str, _BoundedCheck] = {}
        self._down: dict[str, str] = {}
        self._failing_since: float | None = None  # since when a check fails or a dependency is down
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: HealthSettings) -> Health:
        return cls(settings.progress_budget_s, settings.probe_timeout_s)

    def beat(self) -> None:
        """The main loop turned (call at least once per HEALTH_PROGRESS_BUDGET_S, also while waiting)."""
        self._last_beat = self.clock()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready, self._reason = ready, reason

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = _BoundedCheck(name, check, self.clock)

    def dependency_down(self, name: str, reason: str) -> None:
        """`name` cannot be used right now (a reconnect loop is running): not ready until `dependency_up`."""
        self._down[name] = reason

    def dependency_up(self, name: str) -> None:
        self._down.pop(name, None)

    def liveness(self) -> tuple[bool, dict[str, object]]:
        idle = self.clock() - self._last_beat
        detail: dict[str, object] = {"loop_idle_s": round(idle, 3), "budget_s": self.progress_budget_s}
        if idle >= self.progress_budget_s:
            return False, {**detail, "reason": f"the main loop has not turned for {idle:.0f}s"}
        _, why = self.readiness()
        since = self._failing_since
        if since is None:
            return True, detail
        failing = self.clock() - since
        detail["dependencies_failing_s"] = round(failing, 3)
        if failing >= self.progress_budget_s:
            return False, {**detail, "reason": f"a dependency has been failing for {failing:.0f}s", **why}
        return True, detail

    def readiness(self) -> tuple[bool, dict[str, object]]:
        if not self._ready:
            # Starting, rebalancing or shutting down: not a dependency's fault (a stuck start stops the beat).
            with self._lock:
                self._failing_since = None
            return False, {"reason": self._reason}
        checks = list(self._checks.values())
        for check in checks:
            check.begin()
        deadline = self.clock() + self.probe_timeout_s
        failures = {name: f"down: {reason}" for name, reason in list(self._down.items())}
        for check in checks:
            problem = check.outcome(deadline, self.probe_timeout_s)
            if problem:
                failures[check.name] = problem
        with self._lock:
            if not failures:
                self._failing_since = None
            elif self._failing_since is None:
                self._failing_since = self.clock()
        return not failures, {"failing": failures} if failures else {}


class HealthServer:
    def __init__(self, health: Health, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self.health = health
        handler = _make_handler(health, registry)
        self._server = ThreadingHTTPServer(("0.0.0.0", port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(health: Health, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                # `?name[]=a&name[]=b` exposes only those metrics, as prometheus_client's own handler does: a
                # watcher polling one counter often (the benchmarks) then costs the process next to nothing
                names = parse_qs(query).get("name[]")
                source = registry.restricted_registry(names) if names else registry
                self._send(200, generate_latest(source), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = health.liveness() if path == "/healthz" else health.readiness()
                body = json.dumps({"status": "ok" if ok else "fail", **detail}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: keep logs quiet
            pass

    return Handler
