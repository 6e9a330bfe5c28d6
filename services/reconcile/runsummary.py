"""What `make run` needs of the reconciliation: run the command at the end of the demo, and the summary's lines.

The demo runs it as a child process once every writer has stopped and the Snowflake loader has loaded: chDB
allows one process per data folder, and the child exercises exactly the command a CronJob runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .compare import summary_lines as _report_lines

CHECK = "reconcile: ClickHouse, Iceberg and Snowflake agree per day and event type"


def local_env(state_dir: Path, clickhouse_query_port: int | None = None) -> dict[str, str]:
    """The reconciliation's variables for a local run (next to the stack's, the archiver's and the loader's).

    `clickhouse_query_port`: the sink's query port; a stopped sink leaves it closed and the command then reads
    the chDB folder itself (the default port might belong to some other sink on this machine).
    """
    env = {"CLICKHOUSE_CHDB_PATH": str(state_dir / "clickhouse")}
    if clickhouse_query_port is not None:
        env["CLICKHOUSE_SINK_QUERY_PORT"] = str(clickhouse_query_port)
    return env


def run(env: Mapping[str, str], metrics_file: Path | None = None, timeout_s: float = 600) -> dict[str, Any]:
    """`python -m services.reconcile --json` in `env`: {"exit_code", "report" (as_dict) or "error"}."""
    command = [sys.executable, "-m", "services.reconcile", "--json"]
    if metrics_file is not None:
        command += ["--metrics-file", str(metrics_file)]
    done = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    result: dict[str, Any] = {"exit_code": done.returncode}
    try:
        body = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    except ValueError:
        body = {}
    if done.returncode in (0, 1) and "cells" in body:
        result["report"] = body
    else:
        result["error"] = done.stderr.strip() or done.stdout.strip() or f"exited with {done.returncode}"
    return result


def checks(result: Mapping[str, Any]) -> dict[str, bool]:
    return {CHECK: result.get("exit_code") == 0 and bool(result.get("report", {}).get("agrees"))}


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    if "report" in result:
        return _report_lines(result["report"])
    return [f"  reconcile         could not run (exit {result.get('exit_code')}): {result.get('error')}"]
