"""Shared pieces of the benchmarks: a throwaway stack, the machine description, and the two result files."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.kit.paths import repo_root


@dataclass
class Result:
    """One benchmark: our figure against the raw ceiling of the same work, measured in the same run."""

    name: str
    value: float
    unit: str
    ceiling: float
    ceiling_what: str
    note: str = ""

    @property
    def ratio(self) -> float:
        return round(self.value / self.ceiling, 3) if self.ceiling else 0.0


Benchmark = Callable[["BenchContext"], list[Result]]


@dataclass
class BenchContext:
    """What a benchmark gets: the running stack's environment and a scale factor (BENCH_SCALE)."""

    env: dict[str, str]
    scale: float
    work_dir: Path


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(
            next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1]
        )
        memory = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        memory = "?"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def write_results(results: list[Result], json_path: Path, markdown_path: Path) -> None:
    now = datetime.now(UTC)
    info = machine()
    payload = {r.name: {"value": r.value, "unit": r.unit, "ceiling": r.ceiling, "ratio": r.ratio} for r in results}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(payload | {"_meta": {"date": now.isoformat(timespec="seconds"), "machine": info}}, indent=2) + "\n"
    )
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); the same figures are in `.local/bench.json`. Each figure is",
        "compared with the raw ceiling of the same work measured in the same run, so the ratio says what the",
        "platform's own code costs on top of the client library or engine it drives.",
        "",
        f"- date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, {info['os']}, Python {info['python']}",
        "",
        "| benchmark | value | unit | ceiling | ceiling is | ratio | note |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    measured = {r.name for r in results}
    for r in results:
        lines.append(
            f"| {r.name} | {r.value:,.0f} | {r.unit} | {r.ceiling:,.0f} | {r.ceiling_what} | {r.ratio:.2f} | {r.note} |"
        )
    lines += _earlier_rows(markdown_path, measured)
    lines += ["", "See `docs/benchmarks-method.md` for how each figure is measured.", ""]
    lines += _kept_sections(markdown_path)
    markdown_path.write_text("\n".join(lines))


def _kept_sections(markdown_path: Path) -> list[str]:
    """The `## ` sections of the previous file (one-off measurements written by hand, with their own date and
    command, such as a retired engine's comparison): `make bench` does not rerun them, so it keeps them."""
    if not markdown_path.exists():
        return []
    lines = markdown_path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    return [] if start is None else [*lines[start:], ""]


def _earlier_rows(markdown_path: Path, measured: set[str]) -> list[str]:
    """Rows of benchmarks not run this time (BENCH_ONLY), kept from the previous table with their date."""
    if not markdown_path.exists():
        return []
    text = markdown_path.read_text()
    date = next((line[len("- date: ") :] for line in text.splitlines() if line.startswith("- date: ")), "earlier")
    kept = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in measured or cells[0] == "benchmark" or set(cells[0]) <= {"-", ":"}:
            continue
        if "(measured " not in cells[6]:
            cells[6] = f"{cells[6]} (measured {date})".strip()
        kept.append("| " + " | ".join(cells) + " |")
    return kept


def default_paths() -> tuple[Path, Path]:
    root = repo_root()
    return root / ".local" / "bench.json", root / "docs" / "benchmarks.md"


def produce_all(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[str | bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | Callable[[int], list[tuple[str, bytes]]] | None = None,
) -> None:
    """Produce (key, value) records with the platform's producer defaults, waiting out a full local queue;
    raises if any is left undelivered. For seeding benchmark topics and for bare-produce ceilings. `headers` is
    the same for every record, or a function of the record's index."""
    from confluent_kafka import Producer

    from services.kit.kafka import PRODUCER_DEFAULTS

    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap})
    for index, (key, value) in enumerate(records):
        record_headers = headers(index) if callable(headers) else headers
        while True:
            try:
                producer.produce(topic, value, key=key, headers=record_headers)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"producing to {topic} left {remaining} records undelivered")
