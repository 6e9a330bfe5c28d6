"""The column-wise validator against the per-record engine it replaced, measured in one run.

The per-record engine lives on only in git history: this checks out its last commit (`PER_RECORD_ENGINE`) into
a temporary worktree and runs `python -m bench.validator` (the service against the bare consume-then-produce
ceiling, and the processor alone) from it and from this tree, alternating, each on a broker of its own, with
the same events (same seed and count). Run it with `python -m bench.validator_retired`; the table it prints is
the one recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from services.kit.paths import repo_root

PER_RECORD_ENGINE = "ccc4589"  # main before issue 13: the last commit whose validator judged one record at a time
ROUNDS = 2
_LINE = re.compile(r"^(?P<name>[^:]+): (?P<value>[\d,]+) events/s \(ceiling (?P<ceiling>[\d,]+)")


def _run(tree: Path, scale: str) -> dict[str, tuple[float, float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_SCALE": scale}
    done = subprocess.run(
        [sys.executable, "-m", "bench.validator"], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    figures = {}
    for line in done.stdout.splitlines():
        match = _LINE.match(line)
        if match:
            value, ceiling = (float(match[k].replace(",", "")) for k in ("value", "ceiling"))
            figures[match["name"]] = (value, ceiling)
    return figures


def main() -> int:
    root = repo_root()
    scale = os.environ.get("BENCH_SCALE", "0.5")
    with tempfile.TemporaryDirectory(prefix="lp-per-record-") as work:
        old = Path(work) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), PER_RECORD_ENGINE], cwd=root, check=True)
        try:
            best: dict[tuple[str, str], tuple[float, float]] = {}
            for _ in range(ROUNDS):
                for label, tree in (("per-record", old), ("columnar", root)):
                    for name, (value, ceiling) in _run(tree, scale).items():
                        if value > best.get((label, name), (0.0, 0.0))[0]:
                            best[(label, name)] = (value, ceiling)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=root, check=False)
    print(f"| figure | per-record ({PER_RECORD_ENGINE}) | columnar | columnar / per-record |")
    print("|---|---:|---:|---:|")
    for name in ("validator service events/s", "validator processor in-process events/s"):
        old_value, old_ceiling = best[("per-record", name)]
        new_value, new_ceiling = best[("columnar", name)]
        print(f"| {name} | {old_value:,.0f} | {new_value:,.0f} | {new_value / old_value:.1f}x |")
        print(
            f"| ... its ceiling (bare consume-then-produce) | {old_ceiling:,.0f} ({old_value / old_ceiling:.2f}) "
            f"| {new_ceiling:,.0f} ({new_value / new_ceiling:.2f}) | |"
        )
    for (label, name), (value, _) in sorted(best.items()):
        if name not in ("validator service events/s", "validator processor in-process events/s"):
            print(f"| {label}: {name} | {value:,.0f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
