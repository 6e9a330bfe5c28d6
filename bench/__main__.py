"""Run every benchmark against a throwaway local stack on free ports; write docs/benchmarks.md and .local/bench.json.

BENCH_SCALE (default 1.0) scales the amount of work; BENCH_ONLY=name,name runs a subset.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench import (
    archiver,
    cdc,
    clickhouse_sink,
    generator,
    ingest,
    snowflake_loader,
    tracing,
    validator,
    validator_engines,
    validator_runtime,
)
from bench.harness import BenchContext, Benchmark, Result, default_paths, write_results
from services.stack.settings import StackSettings
from services.stack.stack import local_stack

BENCHMARKS: dict[str, Benchmark] = {
    "generator": generator.run,
    "ingest": ingest.run,
    "cdc": cdc.run,
    "validator_runtime": validator_runtime.run,
    "validator": validator.run,
    "validator_engines": validator_engines.run,
    "clickhouse_sink": clickhouse_sink.run,
    "archiver": archiver.run,
    "snowflake_loader": snowflake_loader.run,
    "tracing": tracing.run,  # last: it replaces events.raw
}


def main() -> int:
    scale = float(os.environ.get("BENCH_SCALE", "1.0"))
    only = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]
    chosen = {name: fn for name, fn in BENCHMARKS.items() if not only or name in only}
    json_path, markdown_path = default_paths()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lp-bench-") as work:
        settings = StackSettings.with_free_ports(state_dir=Path(work) / "stack")
        with local_stack(settings) as stack:
            ctx = BenchContext(stack.env(), scale, Path(work))
            for name, benchmark in chosen.items():
                print(f"benchmark {name} ...", flush=True)
                for result in benchmark(ctx):
                    print(
                        f"  {result.name}: {result.value:,.0f} {result.unit} "
                        f"(ceiling {result.ceiling:,.0f}, ratio {result.ratio:.2f})",
                        flush=True,
                    )
                    results.append(result)
    write_results(results, json_path, markdown_path)
    print(f"wrote {markdown_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
