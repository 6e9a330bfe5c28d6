"""What per-message tracing costs the validator service (issue 16): its rate with spans exported to a JSON-lines
file at sample ratios 0 (batch spans only), 0.01 and 1, each as a ratio to ratio 0 in the same run.

Whether an event is sampled is decided where it is produced and travels in its traceparent's flags byte, so each
ratio's events are produced again with that share flagged; the validator then spends a `process` span on each
flagged record and nothing per record on the others (services/kit/tracing.py). Runs alternate over the ratios
and the best of each is kept, as in bench/validator.py: the machine is small and shared.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import BenchContext, Result, produce_all
from bench.validator import _events, _seed_references, _service_rate, recreate_topic
from services.contracts.topics import EVENTS_RAW

RATIOS = (0.0, 0.01, 1.0)
ROUNDS = 3


def traceparent(index: int, ratio: float) -> list[tuple[str, bytes]]:
    """Event `index`'s trace context: its own trace, sampled for an evenly spread `ratio` of the indices."""
    sampled = int((index + 1) * ratio) > int(index * ratio)
    return [("traceparent", b"00-%032x-%016x-%s" % (index + 1, index + 1, b"01" if sampled else b"00"))]


def _fresh_events(bootstrap: str, records: list[tuple[bytes, bytes]], ratio: float) -> None:
    """events.raw holding only `records`, `ratio` of them sampled (the service reads its input from the start)."""
    recreate_topic(bootstrap, EVENTS_RAW)
    produce_all(bootstrap, EVENTS_RAW, records, headers=lambda index: traceparent(index, ratio))


def _process_spans(spans_file: Path) -> int:
    if not spans_file.exists():
        return 0
    with spans_file.open() as lines:
        return sum(1 for line in lines if '"process events.raw"' in line)


def run(ctx: BenchContext) -> list[Result]:
    events = max(30_000, int(200_000 * ctx.scale))
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    simulation, records = _events(events)
    recreate_topic(bootstrap, EVENTS_RAW)  # declares every topic before the references are seeded
    _seed_references(bootstrap, simulation)
    work_dir = Path(tempfile.mkdtemp(prefix="tracing-", dir=ctx.work_dir))
    rates: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
    spans: dict[float, int] = {}
    for round_ in range(ROUNDS):
        for ratio in RATIOS:
            _fresh_events(bootstrap, records, ratio)
            spans_file = work_dir / f"spans-{ratio:g}-{round_}.jsonl"
            env = {**ctx.env, "OTEL_TRACES_FILE": str(spans_file), "OTEL_SAMPLE_RATIO": str(ratio)}
            rates[ratio].append(_service_rate(env, events, work_dir))
            spans[ratio] = _process_spans(spans_file)
    expected = {ratio: int(events * ratio) for ratio in RATIOS}
    if spans[0.0] or not spans[0.01]:  # the runs must have traced what they claim to
        raise RuntimeError(f"per-message spans {spans} do not follow the ratios (expected about {expected})")
    baseline = max(rates[0.0])
    return [
        Result(
            f"validator service, traces sampled at {ratio:g}",
            round(max(rates[ratio])),
            "events/s",
            round(baseline),
            "the same service with batch spans only (ratio 0), same run",
            note=f"{events} events, JSON-lines span exporter; {spans[ratio]:,} per-message spans exported of "
            f"{expected[ratio]:,} sampled (the SDK's batch processor drops what its queue cannot hold); best of "
            f"{ROUNDS} (runs: {', '.join(f'{rate:,.0f}' for rate in rates[ratio])}; at ratio 0: "
            f"{', '.join(f'{rate:,.0f}' for rate in rates[0.0])})",
        )
        for ratio in RATIOS[1:]
    ]
