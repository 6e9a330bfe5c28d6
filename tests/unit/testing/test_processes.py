"""The shared child-process helpers of tests and benchmarks: a run to the end, a stop, and a wait that fails
with the logs at hand."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.kit.paths import repo_root
from services.testing.processes import run_module, start_module, stop, wait_for


def test_run_module_runs_from_the_repository_root_with_this_environment_plus_its_own() -> None:
    done = run_module("tests.unit.testing.test_processes", "an-argument", env={"LP_PROBE": "42"}, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {"cwd": str(repo_root()), "argv": ["an-argument"], "probe": "42", "path": os.environ["PATH"]}


def test_start_module_logs_output_and_stop_returns_the_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "server.log"
    process = start_module("http.server", "0", "--bind", "127.0.0.1", env={"PYTHONUNBUFFERED": "1"}, log_path=log)
    wait_for(lambda: "Serving HTTP" in log.read_text(), 30, "the server to start", log, process=process)
    assert stop(process, timeout=30) == -signal.SIGTERM  # http.server does not handle SIGTERM: killed by it
    assert log.exists()


def test_wait_for_fails_with_what_it_waited_for_and_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("first line\nthe reason it never got ready\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="timed out waiting for readiness") as failure:
        wait_for(lambda: False, 0.3, "readiness", [log, tmp_path / "missing.log"], poll_s=0.05)
    assert "the reason it never got ready" in str(failure.value)
    assert time.monotonic() - started < 5


def test_wait_for_fails_at_once_when_the_process_exits(tmp_path: Path) -> None:
    log = tmp_path / "crash.log"
    process = start_module("this_module_does_not_exist", env={}, log_path=log)
    process.wait(timeout=30)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"exited \(1\) waiting for readiness") as failure:
        wait_for(lambda: False, 60, "readiness", log, process=process)
    assert "No module named this_module_does_not_exist" in str(failure.value)
    assert time.monotonic() - started < 5


def test_wait_for_returns_once_the_condition_holds() -> None:
    calls = iter([False, False, True])
    wait_for(lambda: next(calls), 5, "the third poll", poll_s=0.01)
    assert next(calls, "exhausted") == "exhausted"


def test_stop_leaves_a_finished_process_alone(tmp_path: Path) -> None:
    process = start_module("platform", env={}, log_path=tmp_path / "done.log")
    process.wait(timeout=30)
    assert stop(process) == 0
    assert sys.executable in process.args


if __name__ == "__main__":  # the child of the run_module test: what it was started with
    print(
        json.dumps(
            {"cwd": os.getcwd(), "argv": sys.argv[1:], "probe": os.environ.get("LP_PROBE"), "path": os.environ["PATH"]}
        )
    )
