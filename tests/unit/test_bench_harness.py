"""`make bench` results: a partial run (BENCH_ONLY) replaces its rows and keeps the others with their date."""

from __future__ import annotations

from pathlib import Path

from bench.harness import Result, write_results


def result(name: str, value: float) -> Result:
    return Result(name, value, "events/s", 100.0, "bare client", note="n")


def test_a_partial_run_keeps_the_other_rows_with_their_date(tmp_path: Path) -> None:
    json_path, markdown = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    write_results([result("a", 10), result("b", 20)], json_path, markdown)
    first_date = next(line for line in markdown.read_text().splitlines() if line.startswith("- date: "))[8:]
    write_results([result("b", 30)], json_path, markdown)
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert rows[0].startswith("| b | 30 |")
    assert rows[1].startswith("| a | 10 |") and f"(measured {first_date})" in rows[1]
    write_results([result("b", 40)], json_path, markdown)  # carried once more: the original date stays
    assert markdown.read_text().count("(measured ") == 1
