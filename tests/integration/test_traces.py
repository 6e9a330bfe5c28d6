"""Traces over the real local pipeline: one `make run` (a small one, every event sampled), then its spans file.

A sampled event's trace must hold a span from every stage it passed, each a child of the hop before, with the
messaging conventions' attributes, and batch spans linked to it; a dead-lettered event's trace must end in the
dead-letter span. `python -m services.stack trace` must print it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.stack.settings import StackSettings
from services.stack.traces import build_trace, read_spans, traces_file

pytestmark = pytest.mark.integration

Span = dict[str, Any]


@pytest.fixture(scope="module")
def run_spans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Span]]]:
    from tests.integration.conftest import new_state_dir

    state_dir, owned = new_state_dir(tmp_path_factory, "traces")
    settings = StackSettings.with_free_ports(state_dir=state_dir)
    env = {**os.environ, "LP_STATE_DIR": str(state_dir), "OTEL_SAMPLE_RATIO": "1"}
    env |= {f"LP_{name.upper()}": str(getattr(settings, name)) for name in StackSettings.port_fields()}
    done = subprocess.run(
        [sys.executable, "-m", "services.stack.demo", "--events", "500", "--rate", "1000", "--bad-share", "0.1"],
        env=env,
        capture_output=True,
        timeout=420,
    )
    assert done.returncode == 0, f"{done.stdout.decode()[-2000:]}\n{done.stderr.decode()[-4000:]}"
    yield state_dir, read_spans(traces_file(state_dir))
    if owned:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)


def by_trace(spans: list[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], []).append(span)
    return traces


def children(trace: list[Span], parent: Span) -> list[Span]:
    return [s for s in trace if s["parent_id"] == parent["span_id"]]


def linked_by(spans: list[Span], target: Span) -> list[Span]:
    return [
        s
        for s in spans
        if any(link["trace_id"] == target["trace_id"] and link["span_id"] == target["span_id"] for link in s["links"])
    ]


def assert_producer(span: Span, topic: str) -> None:
    attributes = span["attributes"]
    assert span["kind"] == "PRODUCER" and span["name"] == f"send {topic}"
    assert attributes["messaging.system"] == "kafka" and attributes["messaging.destination.name"] == topic
    assert attributes["messaging.operation.type"] == "send" and attributes["messaging.operation.name"] == "send"


def assert_consumer(span: Span, topic: str, parent: Span) -> None:
    attributes = span["attributes"]
    assert span["kind"] == "CONSUMER" and span["name"] == f"process {topic}"
    assert span["parent_id"] == parent["span_id"] and span["trace_id"] == parent["trace_id"]
    assert attributes["messaging.system"] == "kafka" and attributes["messaging.destination.name"] == topic
    assert attributes["messaging.operation.type"] == "process" and attributes["messaging.operation.name"] == "process"
    assert attributes["messaging.destination.partition.id"].isdigit() and attributes["messaging.kafka.offset"] >= 0
    assert attributes["messaging.consumer.group.name"]
    assert span["start_ns"] >= parent["start_ns"]  # a hop starts after the one before it


def complete_event_traces(spans: list[Span]) -> Iterator[tuple[list[Span], dict[str, Span]]]:
    """Traces of generator events that reached both sinks: (the trace, its span per stage)."""
    for trace in by_trace(spans).values():
        sends = [s for s in trace if s["service"] == "generator" and s["parent_id"] is None]
        if len(sends) != 1:
            continue
        (send,) = sends
        process = [s for s in children(trace, send) if s["service"] == "validator"]
        if len(process) != 1:
            continue
        sinks = {s["service"]: s for s in children(trace, process[0])}
        if {"clickhouse-sink", "archiver"} <= set(sinks):
            yield trace, {"generator": send, "validator": process[0], **sinks}


def test_a_sampled_events_trace_holds_every_stage_as_parent_and_child_with_the_conventions(run_spans):
    state_dir, spans = run_spans
    found = list(complete_event_traces(spans))
    assert found, "no generator event was traced through the validator to both sinks"
    _, stage = found[0]
    assert_producer(stage["generator"], "events.raw")
    assert stage["generator"]["attributes"]["messaging.message.id"]
    assert_consumer(stage["validator"], "events.raw", stage["generator"])
    assert_consumer(stage["clickhouse-sink"], "events.processed", stage["validator"])
    assert_consumer(stage["archiver"], "events.processed", stage["validator"])
    assert stage["validator"]["attributes"]["messaging.consumer.group.name"] == "lp-validator"
    # Batch operations are spans of their own, linked to the messages they carry (capped, so: in some trace).
    assert any(linked_by(spans, t[1]["generator"]) for t in found), "no generator batch span links its events"
    batch_links = [b for t in found for b in linked_by(spans, t[1]["validator"])]
    assert {b["name"] for b in batch_links} >= {"clickhouse.write", "archiver.write"}
    assert all(b["trace_id"] != t[0][0]["trace_id"] and b["parent_id"] is None for t in found[:1] for b in batch_links)
    validator_batches = [b for t in found for b in linked_by(spans, t[1]["generator"]) if b["service"] == "validator"]
    assert validator_batches and all(b["name"] == "validator.process_batch" for b in validator_batches)
    # The Snowflake load cannot link (the lake keeps no headers): it is matched by the offsets it loaded.
    loads = [s for s in spans if s["service"] == "snowflake-loader" and s["name"].startswith("load ")]
    assert loads, "the loader wrote no load span"
    assert any(
        linked["service"] == "snowflake-loader"
        for t in found
        for _, node in build_trace(spans, t[0][0]["trace_id"]).walk()
        for linked in node.linked
    )
    # The command prints one (whose ClickHouse write links to it): every hop, in order, with timings.
    _, stage = next(
        t for t in found if any(b["name"] == "clickhouse.write" for b in linked_by(spans, t[1]["validator"]))
    )
    printed = trace_command(state_dir, stage["generator"]["attributes"]["messaging.message.id"])
    assert stage["generator"]["trace_id"] in printed
    lines = printed.splitlines()
    hops = [
        next(i for i, line in enumerate(lines) if f" {name} " in line)
        for name in ("generator", "validator", "clickhouse-sink")
    ]
    assert hops == sorted(hops) and " ms " in lines[hops[1]]
    assert "archiver" in printed and "~ clickhouse.write" in printed
    print(printed)  # shown with -rP: what a user sees


def test_cdc_changes_and_ingest_events_start_traces_the_validator_continues(run_spans):
    _, spans = run_spans
    for service, topic_prefix in (("cdc", "cdc.postgres."), ("ingest", "events.raw")):
        roots = [s for s in spans if s["service"] == service and s["kind"] == "PRODUCER" and s["parent_id"] is None]
        assert roots, f"{service} started no trace"
        continued = [
            (root, child)
            for root in roots
            for child in spans
            if child["parent_id"] == root["span_id"] and child["service"] == "validator"
        ]
        assert continued, f"no {service} trace reached the validator"
        root, child = continued[0]
        topic = root["attributes"]["messaging.destination.name"]
        assert topic.startswith(topic_prefix)
        assert_producer(root, topic)
        assert_consumer(child, topic, root)


def test_a_dead_lettered_events_trace_ends_in_the_dead_letter_span(run_spans):
    state_dir, spans = run_spans
    traces = by_trace(spans)
    letters = [s for s in spans if "lp.dlq.code" in s["attributes"] and s["service"] == "validator"]
    assert letters, "no sampled event was dead-lettered"
    for letter in letters[:20]:
        trace = traces[letter["trace_id"]]
        by_id = {s["span_id"]: s for s in trace}
        assert_producer(letter, letter["attributes"]["messaging.destination.name"])
        assert letter["attributes"]["messaging.destination.name"].endswith(".dlq")
        assert by_id[letter["parent_id"]]["name"].startswith("process ")
        ancestors = []
        span = letter
        while span["parent_id"] is not None:
            span = by_id[span["parent_id"]]
            ancestors.append(span)
        # Nothing follows the dead letter: every other span of the trace is on its path, the first a producer's.
        assert {s["span_id"] for s in trace} == {letter["span_id"], *(s["span_id"] for s in ancestors)}
        assert ancestors[-1]["kind"] == "PRODUCER" and ancestors[-1]["service"] in ("generator", "ingest", "cdc")
    printed = trace_command(state_dir, letters[0]["trace_id"])
    assert "DEAD LETTER" in printed.splitlines()[-1]  # the last hop
    print(printed)


def trace_command(state_dir: Path, wanted: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.stack", "trace", wanted, "--state-dir", str(state_dir)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()
