"""Exactly once at the source, without a broker: stamps, what recovery drops, and the runner's floors."""

from __future__ import annotations

import asyncio

from services.contracts.headers import SOURCE
from services.validator.recovery import (
    Emitted,
    Logged,
    drop_emitted,
    note_stamp,
    parse_stamp,
    produced_headers,
    stamp_outputs,
    with_stamp,
)
from services.validator.runtime import Batch, Output, Record, headers_with_trace
from tests.unit.validator.test_runtime_stream import copy_to, make_runner, records


def test_every_output_is_stamped_with_its_input_and_its_place_among_that_inputs_outputs():
    a, b = Record("in", 2, 10, b"k", b"a"), Record("in", 0, 7, b"k", b"b")
    outputs = [Output("x", None, b"", source=a), Output("y", None, b"", source=b), Output("z", None, b"", source=a)]
    outputs.append(Output("w", None, b""))  # no source: nothing to stamp
    stamps = stamp_outputs(outputs)
    assert stamps == [b"in:2:10:0/2", b"in:0:7:0/1", b"in:2:10:1/2", None]
    assert parse_stamp(stamps[2]) == ("in", 2, 10, 1, 2)
    assert parse_stamp(b"garbage") is None and parse_stamp(None) is None


def test_one_output_per_source_is_stamped_as_the_general_way_would():
    sources = [Record("in", offset % 3, offset, b"k", b"v") for offset in range(50)]
    one_each = [Output("out", None, b"", source=source) for source in sources]
    with_a_sourceless = [*one_each, Output("out", None, b"")]  # not one output per source: the general way
    assert stamp_outputs(one_each) == stamp_outputs(with_a_sourceless)[:-1]
    assert stamp_outputs(one_each)[4] == b"in:1:4:0/1"


def test_produced_headers_are_the_trace_then_the_stamp_whatever_the_output_carries():
    traced = Record("in", 0, 1, b"k", b"v", [("traceparent", b"00-source"), ("tracestate", b"s")])
    untraced = Record("in", 0, 2, b"k", b"v", [("other", b"1")])
    fallback = [("traceparent", b"00-batch")]
    outputs = [
        Output("out", None, b"", [("traceparent", b"00-own")], source=traced),  # the usual output
        Output("out", None, b"", [("traceparent", b"00-own"), (SOURCE, b"in:9:9:0/1")], source=traced),
        Output("out", None, b"", [(SOURCE, b"in:9:9:0/1")], source=traced),
        Output("out", None, b"", [("h", b"1")], source=untraced),
        Output("out", None, b"", ()),
    ]
    for output in outputs:
        for stamp in (b"in:0:1:0/1", None):
            expected = with_stamp(headers_with_trace(output, fallback), stamp)
            assert produced_headers(output, fallback, stamp) == expected
    assert produced_headers(outputs[0], fallback, b"s") == [("traceparent", b"00-own"), (SOURCE, b"s")]


def test_a_copied_source_header_is_replaced_not_repeated():
    headers = with_stamp([("traceparent", b"t"), (SOURCE, b"events.raw:1:1:0/1")], b"events.raw.retry:3:4:0/1")
    assert headers == [("traceparent", b"t"), (SOURCE, b"events.raw.retry:3:4:0/1")]


def emitted_from(stamps: list[tuple[str, bytes]]) -> Emitted:
    emitted: Emitted = {("in", 0): {}}
    for topic, stamp in stamps:
        note_stamp(emitted, topic, stamp)
    return emitted


def test_outputs_found_in_the_log_are_dropped_and_missing_ones_kept():
    record, other = Record("in", 0, 5, b"k", b"v"), Record("in", 0, 6, b"k", b"v")
    outputs = [Output("processed", b"k", b"1", source=record), Output("history", b"k", b"2", source=record)]
    outputs.append(Output("processed", b"k", b"3", source=other))
    # The crash left the second output of offset 5 acknowledged, not the first; offset 6 never went out.
    emitted = emitted_from([("history", b"in:0:5:1/2"), ("unrelated", b"in:1:5:0/1")])
    kept, stamps, dropped = drop_emitted(outputs, stamp_outputs(outputs), emitted)
    assert [o.value for o in kept] == [b"1", b"3"] and dropped == 1
    assert stamps == [b"in:0:5:0/2", b"in:0:6:0/1"]
    assert emitted == {("in", 0): {}}  # an entry is used once


def test_an_input_that_now_gives_other_outputs_keeps_what_the_log_has():
    record = Record("in", 0, 5, b"k", b"v")
    emitted: Emitted = {("in", 0): {5: Logged(1, {0: "events.raw.retry"})}}  # not due then, due now
    outputs = [Output("events.processed", b"k", b"1", source=record)]
    kept, _, dropped = drop_emitted(outputs, stamp_outputs(outputs), emitted)
    assert kept == [] and dropped == 1


def test_the_runner_drops_recovered_outputs_and_moves_floors_with_delivered_batches():
    async def scenario() -> None:
        runner, app, producer = make_runner(copy_to("out"), {"out": 1})
        runner._emitted = {("in", 0): {0: Logged(1, {0: "out"}), 1: Logged(1, {0: "out"})}}
        batch = Batch.of(records(9))  # offsets 0-2 of partitions 0, 1, 2
        runner._in_flight.append(await runner._start(batch))
        produced = [record for *_, b, _ in producer.sent for record in b.records]
        assert len(produced) == 7 and runner.suppressed == 2
        assert all(dict(headers)[SOURCE] not in (b"in:0:0:0/1", b"in:0:1:0/1") for _, _, headers in produced)
        assert runner._emitted == {}  # the batch read past everything recovery found
        assert runner.floors == {}  # nothing delivered yet
        producer.ack_all()
        await runner._complete_oldest()
        assert runner.floors == {("out", 0): 7} and app.delivered == [batch.next_offsets]

    asyncio.run(scenario())


def test_floors_are_stored_only_for_partitions_recovered_and_committed_past_what_recovery_found():
    class Store:
        def __init__(self) -> None:
            self.writes: list[tuple[list[tuple[str, int]], dict[tuple[str, int], int]]] = []

        def write(self, partitions: list[tuple[str, int]], floors: dict[tuple[str, int], int]) -> None:
            self.writes.append((partitions, floors))

    async def scenario() -> None:
        runner, _, _ = make_runner(copy_to("out"), {"out": 1})
        store = Store()
        runner.floor_store = store  # type: ignore[assignment]
        runner.to_recover([("in", 0)])
        runner._newest = {("in", 1): 50}
        runner.store_floors({("in", 0): None, ("in", 1): 50, ("in", 2): 3}, {("out", 0): 9}, version=4)
        await runner._floor_task  # type: ignore[misc]
        # in/0 is not recovered yet; in/1 is committed at, not past, the newest output recovery found.
        assert store.writes == [([("in", 2)], {("out", 0): 9})]
        runner.store_floors({("in", 2): 3}, {("out", 0): 9}, version=4)  # floors unchanged since: no write
        runner.store_floors({("in", 1): 51}, {("out", 0): 9}, version=4)  # committed past what recovery found
        await runner._floor_task  # type: ignore[misc]
        assert store.writes[1:] == [([("in", 1)], {("out", 0): 9})]

    asyncio.run(scenario())
