"""Platform services as child processes of a local run: one log file each, stopped with SIGTERM like a pod."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.stack.components import process_create_time, stop_process_group


@dataclass
class ServiceProcess:
    """`python -m <module>` with the stack's environment plus its own; `bounded` ones exit when done."""

    name: str
    module: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    bounded: bool = False
    popen: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, base_env: dict[str, str], *, append_log: bool = False) -> None:
        """Start the process; `append_log` keeps the log of an earlier start (a restart after a kill)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **base_env,
            "SERVICE_NAME": self.name,
            "HTTP_PORT": str(self.http_port),
            **self.env,
        }
        with self.log_path.open("ab" if append_log else "wb") as log:  # one run per log: a tail shows this run
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: Ctrl-C reaches it only through us, in order
            )

    def kill(self) -> None:
        """SIGKILL, no clean-up (the chaos runs of the demo); waits until it is gone."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            stop_process_group(
                self.popen.pid, create_time=process_create_time(self.popen.pid), timeout=timeout, reap=self.popen
            )
        return self.popen.poll()

    def metrics(self) -> dict[str, float]:
        """Sum of each metric's samples on the service's /metrics (empty if it does not answer yet)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=1) as response:
                text = response.read().decode()
        except (OSError, http.client.HTTPException):  # not up yet, or killed mid-answer (IncompleteRead)
            return {}
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def wait_healthy(self, timeout: float = 30.0) -> bool:
        """Until /healthz answers (the process is up); False if it exits or the time runs out."""
        return self._wait_for_endpoint("/healthz", timeout)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Until /readyz answers 200 (connected and able to work); False if it exits or the time runs out."""
        return self._wait_for_endpoint("/readyz", timeout)

    def _wait_for_endpoint(self, path: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=1):
                    return True
            except OSError:  # refused, or an HTTP error status (503: not ready yet)
                time.sleep(0.2)
        return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
