"""Exactly one row per event in every store and view, whatever crashes upstream.

`make run`'s own run (services.stack.demo.DemoRun) on a stack of this module's own, with a chaos monkey:
`kill -9` of the validator, the ClickHouse sink and the archiver five times each while 50,000 events are
produced, each restarted 1-3 s later; then the validator alone killed five times while it catches up at full
speed with a load produced before it started. Afterwards every store holds one row per processed event: the
run's checks (ClickHouse without FINAL and its views, Iceberg, Snowflake, the reconciliation) and the row
counts below, compared across the stores.

The generator injects its usual share of bad events (`make run`'s 2 %), duplicates among them: a producer's
copy of an event is dead-lettered as DUPLICATE even when its original was accepted before a validator restart
(the restarted worker reads its duplicate window back from events.processed), so it never becomes a second
row either; the run's checks say every injected bad event was dead-lettered and no good one.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from services.contracts.topics import EVENTS_PROCESSED, TRANSACTIONS_PROCESSED
from services.stack import LocalStack, StackSettings
from services.stack.demo import Chaos, DemoRun
from tests.integration.conftest import new_state_dir

pytestmark = pytest.mark.integration

CRASHED = ("validator", "clickhouse-sink", "archiver")
BAD_SHARE = 0.02  # as `make run` (services/stack/demo.py --bad-share)


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state_dir, owned = new_state_dir(tmp_path_factory, "chaos")
    local = LocalStack(StackSettings.with_free_ports(state_dir=state_dir))
    local.start()
    try:
        yield local
    finally:
        local.stop()
        if owned:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def totals() -> dict[str, int]:
    """Processed records of the runs so far on the module's stack (the stores hold them all)."""
    return {EVENTS_PROCESSED: 0, TRANSACTIONS_PROCESSED: 0}


def run_with_chaos(stack: LocalStack, chaos: Chaos, events: int, rate: float, seed: int) -> dict[str, Any]:
    run = DemoRun(stack, events, rate, seed, bad_share=BAD_SHARE, chaos=chaos)
    try:
        return run.execute()
    finally:
        run.halt_chaos()
        for service in run.services:
            service.stop()


def assert_one_row_per_event(summary: dict[str, Any], totals: dict[str, int]) -> None:
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert not failed, f"checks failed: {failed}\n{summary['stores']}\n{summary['snowflake']}"
    topics = summary["topics"]
    totals[EVENTS_PROCESSED] += topics[EVENTS_PROCESSED]
    totals[TRANSACTIONS_PROCESSED] += topics[TRANSACTIONS_PROCESSED]
    processed = totals[EVENTS_PROCESSED]
    stores, warehouse = summary["stores"], summary["snowflake"]["rows"]
    # events.processed itself: one record per processed event (the checks: processed + dead letters = events.raw).
    assert topics[EVENTS_PROCESSED] == summary["validator"]["processed"][EVENTS_PROCESSED] > 0
    # Every store: rows (no FINAL, no DISTINCT) equal the processed events.
    assert stores["clickhouse.user_events_realtime"] == processed
    assert stores["iceberg.user_events"] == processed
    assert warehouse["RAW.USER_EVENTS"] == warehouse["STAGING.EVENTS_CLEANED"] == processed
    assert summary["archive"]["transactions"]["rows_in_table"] == totals[TRANSACTIONS_PROCESSED]
    report = summary["reconcile"]["report"]
    assert report["agrees"], report


def outputs_found_by_recoveries(stack: LocalStack) -> int:
    """Outputs the validator's restarts found already produced (and did not produce again), from its log."""
    text = (stack.log_dir / "validator.log").read_text(errors="replace")
    return sum(int(found) for found in re.findall(r"recovered \d+ input partitions: (\d+) outputs", text))


def test_kill_9_loops_of_validator_sink_and_archiver_during_a_load(chaos_stack, totals):
    summary = run_with_chaos(chaos_stack, Chaos(CRASHED, kills=5, seed=12), events=50_000, rate=500, seed=1201)
    assert summary["chaos"]["kills"] == dict.fromkeys(CRASHED, 5)
    assert_one_row_per_event(summary, totals)
    found = outputs_found_by_recoveries(chaos_stack)
    assert found > 0  # the kills did leave outputs of uncommitted inputs behind: each would have been a duplicate
    print(f"validator restarts found {found} outputs already produced")


def test_kill_9_loop_of_the_validator_during_catch_up_at_full_speed(chaos_stack, totals):
    # Seeds far apart: the run's ingest-API events come from seed + 1, which must not be another run's seed.
    chaos = Chaos(("validator",), kills=5, catch_up=True, seed=13)
    summary = run_with_chaos(chaos_stack, chaos, events=50_000, rate=0, seed=5202)
    assert summary["chaos"]["kills"] == {"validator": 5}
    assert_one_row_per_event(summary, totals)
    found = outputs_found_by_recoveries(chaos_stack)
    assert found > 0
    print(f"validator restarts found {found} outputs already produced")
