"""The exit codes: their numbers are a contract (Kubernetes, Jobs, make, tests), the docs list them all, and the
kit's service frame really ends a process with them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from services.kit.exits import ExitCode, killed_by
from services.kit.paths import repo_root


def test_the_numbers_never_change() -> None:
    assert {name: int(code) for name, code in ExitCode.__members__.items()} == {
        "OK": 0,
        "FAILED": 1,
        "CONFIG": 2,
        "NO_VERDICT": 2,
        "SHUTDOWN_TIMEOUT": 3,
        "NOT_RUNNING": 3,
        "INJECTED_CRASH": 86,
        "INTERRUPTED": 130,
    }


def test_the_documented_table_lists_every_name_with_its_number() -> None:
    text = (repo_root() / "docs" / "configuration.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {name: int(number) for number, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    assert documented == {name: int(code) for name, code in ExitCode.__members__.items()}


def test_a_signal_ends_a_process_with_128_plus_its_number() -> None:
    assert killed_by(signal.SIGINT) == ExitCode.INTERRUPTED
    assert killed_by(signal.SIGTERM) == 143


# A service whose start or stop misbehaves on demand (MODE), run as a real process through `main_for`.
_SERVICE = textwrap.dedent(
    """
    import os, time
    from services.kit.config import ServiceSettings
    from services.kit.service import Service, main_for

    class Probe(Service[ServiceSettings]):
        def start(self):
            if os.environ["MODE"] == "fail":
                raise RuntimeError("dependency down")

        def step(self):
            return False  # a bounded run: done at once

        def stop(self):
            if os.environ["MODE"] == "slow-stop":
                time.sleep(30)

    raise SystemExit(main_for(Probe, ServiceSettings))
    """
)


@pytest.mark.parametrize(
    ("mode", "bootstrap", "expected"),
    [
        ("ok", "127.0.0.1:1", ExitCode.OK),
        ("fail", "127.0.0.1:1", ExitCode.FAILED),
        ("ok", "", ExitCode.CONFIG),  # KAFKA_BOOTSTRAP_SERVERS empty: refused before anything runs
        ("slow-stop", "127.0.0.1:1", ExitCode.SHUTDOWN_TIMEOUT),
    ],
)
def test_the_service_frame_exits_with_the_named_code(mode: str, bootstrap: str, expected: ExitCode) -> None:
    env = os.environ | {
        "MODE": mode,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "HTTP_PORT": "0",
        "SHUTDOWN_TIMEOUT_S": "0.5",
        "LOG_FORMAT": "text",
    }
    done = subprocess.run(
        [sys.executable, "-c", _SERVICE], env=env, cwd=repo_root(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == expected, done.stderr[-2000:]
    if expected == ExitCode.CONFIG:
        assert "KAFKA_BOOTSTRAP_SERVERS" in done.stderr  # the message names the variable
