"""The demo's side: the command as a child process, its check and its summary lines, also when it fails."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from services.reconcile import runsummary
from services.reconcile.compare import Figures, compare


def test_a_command_that_cannot_run_is_a_failed_check_with_its_message(tmp_path: Path):
    result = runsummary.run({"RECONCILE_STORES": "iceberg"}, tmp_path / "m.prom", timeout_s=60)
    assert result["exit_code"] == 2 and "report" not in result
    assert "RECONCILE_STORES" in result["error"]
    assert runsummary.checks(result) == {runsummary.CHECK: False}
    (line,) = runsummary.summary_lines(result)
    assert "could not run (exit 2)" in line and "RECONCILE_STORES" in line


def test_a_report_gives_totals_verdict_and_differing_cells():
    day = date(2026, 11, 2)
    report = compare({"clickhouse": {(day, "login"): Figures(2, 0.0)}, "iceberg": {(day, "login"): Figures(3, 0.0)}})
    result = {"exit_code": 1, "report": report.as_dict()}
    assert runsummary.checks(result) == {runsummary.CHECK: False}
    assert runsummary.summary_lines(result) == [
        "  reconcile clickhouse  2 events, 2 rows, revenue 0.00",
        "  reconcile iceberg     3 events, 3 rows, revenue 0.00",
        f"  reconcile {report.verdict()}",
        "    differs       2026-11-02 login: events clickhouse=2, iceberg=3",
    ]
    assert runsummary.local_env(Path("/s"), 8130) == {
        "CLICKHOUSE_CHDB_PATH": "/s/clickhouse",
        "CLICKHOUSE_SINK_QUERY_PORT": "8130",
    }
