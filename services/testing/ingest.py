"""Run `python -m services.ingest` as a child process on free ports (tests, benchmarks).

with IngestProcess(stack.env(), topic="events.raw", log_path=tmp / "ingest.log") as server:
    with IngestClient(server.target) as client:
        client.publish([...])
# SIGTERM on the way out; server.exit_code tells how it ended
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from services.ingest.client import IngestClient
from services.stack.settings import pick_free_ports


class IngestProcess:
    def __init__(
        self,
        base_env: Mapping[str, str],
        topic: str = "events.raw",
        log_path: Path | None = None,
        **settings: str | int | float,
    ) -> None:
        """`base_env`: at least KAFKA_BOOTSTRAP_SERVERS; `settings`: IngestSettings fields, e.g. max_pending=500."""
        self.grpc_port, self.http_port = pick_free_ports(2)
        self.log_path = log_path
        self.env = {
            **os.environ,
            **base_env,
            "SERVICE_NAME": "ingest",
            "EVENTS_TOPIC": topic,
            "GRPC_PORT": str(self.grpc_port),
            "HTTP_PORT": str(self.http_port),
            "LOG_FORMAT": "text",
            **{name.upper(): str(value) for name, value in settings.items()},
        }
        self.popen: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def start(self, timeout_s: float = 60.0) -> IngestProcess:
        """Start the server and wait until its gRPC health says SERVING (raise with the log tail if it dies)."""
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "services.ingest"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if self.log_path:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        with IngestClient(self.target) as client:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"ingest server exited with {self.popen.returncode}\n{self.log_tail()}")
                if client.health(timeout_s=1.0) == "SERVING":
                    return self
                time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"ingest server not SERVING after {timeout_s:.0f}s\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM and wait; returns the exit code (SIGKILL after `timeout_s`, then the code is negative)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.exit_code = self.popen.returncode
        return self.exit_code

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> IngestProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
