"""`make run` end to end: its own stack on free ports, twice in a row, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from services.stack.settings import StackSettings

pytestmark = pytest.mark.integration


def stack_processes(*markers: str) -> list[str]:
    """Command lines of live processes that mention any marker (state dir, broker address)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            found.append(f"{entry}: {cmdline}")
    return found


def test_make_run_twice_then_nothing_left(stack_state_dir):
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    env = {**os.environ, "LP_STATE_DIR": str(settings.state_dir)}
    env |= {f"LP_{name.upper()}": str(getattr(settings, name)) for name in StackSettings.port_fields()}
    for attempt in (1, 2):
        seed = ["--seed", "5"] if attempt == 1 else []  # the second run picks a new seed: new users and events
        done = subprocess.run(
            [sys.executable, "-m", "services.stack.demo", "--events", "2000", "--rate", "1000", *seed],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, f"run {attempt}:\n{done.stdout.decode()[-2000:]}\n{done.stderr.decode()[-4000:]}"
        summary = json.loads((settings.state_dir / "run-summary.json").read_text())
        assert summary["events_produced"] == 2000
        api = summary["ingest_api"]
        assert api["sent"] == 100 and api["rejected"] == {"MISSING_FIELD": 2}  # every 50th from index 7 has no id
        assert summary["topics"]["events.raw"] == 2000 + api["accepted"] == 2098
        assert summary["ok"] is True and all(summary["checks"].values())
        assert summary["stores"]["postgres.users"] >= 1000
        assert summary["stores"]["postgres.transactions"] >= summary["purchases"]["events"] > 0
        assert summary["purchases"]["postgres_rows_found"] == summary["purchases"]["events"]
        assert set(summary["latency_ms"]["generator->events.raw (produce to ack)"]) == {"p50", "p95", "p99"}
        cdc = summary["cdc"]["events_by_table"]
        if attempt == 1:  # a fresh database: every row the generator wrote is an insert CDC captured
            assert cdc["users"]["c"] == 1000 and cdc["products"]["c"] == 500
            assert cdc["transactions"]["c"] == summary["stores"]["postgres.transactions"]
        else:
            # The local broker starts with an empty log, so CDC notices the new cluster id and snapshots the rows
            # of run 1 again (the validator needs those users and products); run 2's new rows are inserts.
            assert summary["params"]["seed"] != 5
            assert cdc["users"]["r"] == 1000 and cdc["users"]["c"] == 1000
            assert cdc["products"]["r"] == 500 and cdc["products"]["c"] == 500
            assert summary["validator"]["dead_lettered_good_generator_events"] == 0
        assert stack_processes(str(settings.state_dir), f"127.0.0.1:{settings.broker_port}") == []


def start_demo(settings: StackSettings, events: int = 100_000) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LP_STATE_DIR": str(settings.state_dir)}
    env |= {f"LP_{name.upper()}": str(getattr(settings, name)) for name in StackSettings.port_fields()}
    return subprocess.Popen(
        [sys.executable, "-m", "services.stack.demo", "--events", str(events), "--rate", "500"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_generator(settings: StackSettings, timeout: float = 180) -> int:
    """The generator's pid once it has produced something (its log says it is generating)."""
    import time

    log = settings.state_dir / "logs" / "generator.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and '"msg": "generating"' in log.read_text(errors="replace"):
            for pid in stack_processes("services.generator"):
                return int(pid.split(":")[0])
        time.sleep(0.5)
    raise AssertionError("the generator never started")


def test_ctrl_c_stops_everything(stack_state_dir):
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    demo = start_demo(settings)
    try:
        wait_for_generator(settings)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert b"interrupted: stopping everything" in demo.stderr.read()
    assert stack_processes(str(settings.state_dir), f"127.0.0.1:{settings.broker_port}", "services.generator") == []


def test_a_failing_part_is_named_with_its_log_and_everything_stops(stack_state_dir):
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    demo = start_demo(settings)
    try:
        os.kill(wait_for_generator(settings), signal.SIGKILL)
        assert demo.wait(timeout=60) == 1
    finally:
        if demo.poll() is None:
            demo.kill()
    stderr = demo.stderr.read().decode()
    assert "generator failed: exited with -9" in stderr
    assert f"log: {settings.state_dir / 'logs' / 'generator.log'}" in stderr
    assert stack_processes(str(settings.state_dir), f"127.0.0.1:{settings.broker_port}", "services.generator") == []
