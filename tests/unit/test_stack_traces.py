"""`python -m services.stack trace`: one event's spans as a tree, batch spans and the loader's load beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.stack.cli import main
from services.stack.traces import build_trace, format_trace, list_traces, read_spans, trace_id_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(name: str, service: str, span_id: str, parent: str | None, start_ms: float, end_ms: float, **extra: Any):
    return {
        "name": name,
        "service": service,
        "trace_id": extra.pop("trace_id", TRACE),
        "span_id": span_id,
        "parent_id": parent,
        "start_ns": int(start_ms * 1e6),
        "end_ns": int(end_ms * 1e6),
        "kind": extra.pop("kind", "CONSUMER"),
        "attributes": extra.pop("attributes", {}),
        "links": extra.pop("links", []),
    }


SPANS = [
    span(
        "send events.raw",
        "generator",
        "a" * 16,
        None,
        0,
        1,
        kind="PRODUCER",
        attributes={"messaging.message.id": "e-1"},
    ),
    span(
        "process events.raw",
        "validator",
        "b" * 16,
        "a" * 16,
        10,
        30,
        attributes={"messaging.destination.partition.id": "2", "messaging.kafka.offset": 7},
    ),
    span(
        "process events.processed",
        "archiver",
        "c" * 16,
        "b" * 16,
        40,
        90,
        attributes={
            "messaging.destination.name": "events.processed",
            "messaging.destination.partition.id": "1",
            "messaging.kafka.offset": 5,
            "lp.sink": "archiver",
        },
    ),
    span(  # the same record in ClickHouse: the loader does not read ClickHouse
        "process events.processed",
        "clickhouse-sink",
        "9" * 16,
        "b" * 16,
        41,
        80,
        attributes={
            "messaging.destination.name": "events.processed",
            "messaging.destination.partition.id": "1",
            "messaging.kafka.offset": 5,
            "lp.sink": "clickhouse",
        },
    ),
    span(
        "archiver.write",
        "archiver",
        "d" * 16,
        None,
        40,
        90,
        kind="INTERNAL",
        trace_id="1" * 32,
        links=[{"trace_id": TRACE, "span_id": "b" * 16}],
    ),
    span(
        "load events",
        "snowflake-loader",
        "e" * 16,
        None,
        200,
        400,
        kind="INTERNAL",
        trace_id="2" * 32,
        attributes={"lp.loader.offsets": ["events.processed:1:0-6", "events.processed:0:0-9"]},
    ),
    span(
        "load events",
        "snowflake-loader",
        "f" * 16,
        None,
        500,
        600,
        kind="INTERNAL",
        trace_id="3" * 32,
        attributes={"lp.loader.offsets": ["events.processed:1:6-9"]},  # a later load: not this record's
    ),
]


def test_a_trace_prints_as_a_tree_with_offsets_durations_and_what_links_to_it():
    assert trace_id_for(SPANS, "e-1") == TRACE and trace_id_for(SPANS, TRACE.upper()) == TRACE
    assert trace_id_for(SPANS, "nope") is None
    found = build_trace(SPANS, TRACE)
    assert [(depth, node.span["service"]) for depth, node in found.walk()] == [
        (0, "generator"),
        (1, "validator"),
        (2, "archiver"),
        (2, "clickhouse-sink"),
    ]
    lines = format_trace(found).splitlines()
    assert lines[0].startswith(f"trace {TRACE}: 4 spans over 4 services, 90.0 ms")
    assert (
        "+10.0 ms" in lines[3]
        and "20.0 ms" in lines[3]
        and "    process events.raw  [partition 2 offset 7]" in lines[3]
    )
    assert "~ archiver.write (batch span, linked" in lines[4]
    # The load that holds offset 5 of events.processed partition 1, under the archiver's span only.
    assert "archiver" in lines[5] and "      process events.processed" in lines[5]
    assert lines[6].split()[:4] == ["+200.0", "ms", "200.0", "ms"] and "~ load events" in lines[6]
    assert sum("load events" in line for line in lines) == 1  # not the later load, not under ClickHouse's span


def test_the_command_lists_traced_messages_and_prints_one(tmp_path: Path, capsys):
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in SPANS) + "\n" + '{"cut sh')  # a line cut by a kill
    assert len(read_spans(path)) == len(SPANS)
    assert list_traces(read_spans(path)).splitlines()[1].split() == [
        TRACE,
        "e-1",
        "generator",
        ">",
        "validator",
        ">",
        "archiver",
        ">",
        "clickhouse-sink",
    ]
    assert main(["trace", "e-1", "--file", str(path)]) == 0
    assert f"trace {TRACE}" in capsys.readouterr().out
    assert main(["trace", "unknown", "--file", str(path)]) == 1
    assert main(["trace", "--file", str(tmp_path / "missing.jsonl")]) == 1
