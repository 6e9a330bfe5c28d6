"""`/healthz`, `/readyz` and `/metrics` over HTTP, served from a daemon thread.

Liveness means the service's main loop is still turning (it beats at least every `stall_after_s`); readiness
means its dependencies answered at start and it is not shutting down. Kubernetes restarts on the first and
routes (or holds back) on the second.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], str | None]  # returns None when fine, else why not ready


class Health:
    def __init__(self, stall_after_s: float = 60.0) -> None:
        self.stall_after_s = stall_after_s
        self._last_beat = time.monotonic()
        self._ready = False
        self._reason = "starting"
        self._checks: dict[str, ReadinessCheck] = {}

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready, self._reason = ready, reason

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def liveness(self) -> tuple[bool, dict[str, object]]:
        idle = time.monotonic() - self._last_beat
        return idle < self.stall_after_s, {"loop_idle_s": round(idle, 3)}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        if not self._ready:
            return False, {"reason": self._reason}
        failures = {}
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as error:  # a failing check is "not ready", never a crash of the server
                problem = f"{type(error).__name__}: {error}"
            if problem:
                failures[name] = problem
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
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
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
