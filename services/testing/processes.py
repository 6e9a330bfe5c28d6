"""Services as child processes of a test or benchmark: `python -m <module>` started, run to the end, stopped,
and waiting on a condition with the logs at hand when it does not come true."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from services.kit.paths import repo_root


def start_module(
    module: str, *args: str, env: Mapping[str, str], log_path: Path, append: bool = False
) -> subprocess.Popen[bytes]:
    """`python -m <module> <args>` from the repository root with this process's environment plus `env`; its
    output (stdout and stderr) goes to `log_path`, truncated first unless `append`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **env},
            cwd=repo_root(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def run_module(
    module: str, *args: str, env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` run to its end (a command line, a run-once job); output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, as Kubernetes stops a pod, and its exit code; SIGKILL after `timeout` (the code is then -9)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL if it still runs (the clean-up of a test that failed half-way)."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


def log_tails(logs: Path | Iterable[Path], chars: int = 4000) -> str:
    """The end of each log that exists, under its path."""
    paths = [logs] if isinstance(logs, Path) else list(logs)
    return "\n".join(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}" for path in paths if path.exists())


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    logs: Path | Iterable[Path] = (),
    *,
    process: subprocess.Popen[bytes] | None = None,
    poll_s: float = 0.5,
) -> None:
    """Poll `condition` until it holds; after `timeout` seconds (or as soon as `process` exited) fail the test
    with `what` and the tails of `logs`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) waiting for {what}\n{log_tails(logs)}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}\n{log_tails(logs)}")
