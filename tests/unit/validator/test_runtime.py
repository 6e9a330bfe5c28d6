"""The runtime's pure part: running a processor safely, dead letters, trace headers, batches, topics."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from services.contracts.deadletter import MAX_MESSAGE_BYTES, parse_dead_letter
from services.contracts.headers import (
    DLQ_ATTEMPT,
    DLQ_ERROR_CODE,
    DLQ_FIELD,
    DLQ_MESSAGE,
    DLQ_ORIGINAL_OFFSET,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_TOPIC,
    DLQ_RULE,
    DLQ_STAGE,
    DLQ_TIME,
    DLQ_TRACE_ID,
)
from services.contracts.topics import DLQ_SUFFIX
from services.validator.runtime import (
    PROCESSOR_EXCEPTION,
    PROCESSOR_OUTPUT_INVALID,
    Batch,
    InputRecord,
    InvalidOutput,
    Output,
    Record,
    StreamRuntimeSettings,
    TopicsMissing,
    check_outputs,
    dead_letter,
    headers_with_trace,
    load_processor,
    required_output_topics,
    resolve_input_topics,
    run_processor,
    trace_headers,
)

NOW = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


def record(offset: int = 0, value: bytes = b"ok", topic: str = "events.raw", partition: int = 0, **kw) -> Record:
    return Record(topic, partition, offset, b"key-%d" % offset, value, **kw)


def copy_to(topic: str):
    def process(batch: list[InputRecord]) -> list[Output]:
        outputs = []
        for r in batch:
            if r.value.startswith(b"bad"):
                raise ValueError(f"bad record at {r.offset}")
            outputs.append(Output(topic, r.key, r.value, source=r))
        return outputs

    return process


# --- run_processor ---------------------------------------------------------------------------------------------
def test_a_good_batch_is_processed_in_one_call():
    calls: list[int] = []

    def process(batch):
        calls.append(len(batch))
        return copy_to("out")(batch)

    result = run_processor(process, [record(i) for i in range(5)], now=lambda: NOW)
    assert calls == [5]
    assert [o.value for o in result.outputs] == [b"ok"] * 5
    assert (result.dead_letters, result.batch_failed) == (0, False)


def test_a_raising_batch_is_retried_record_by_record_and_only_the_bad_record_is_dead_lettered():
    batch = [record(0), record(1, b"bad!"), record(2)]
    result = run_processor(copy_to("out"), batch, now=lambda: NOW)
    assert result.batch_failed and result.dead_letters == 1
    assert [(o.topic, o.value) for o in result.outputs] == [
        ("out", b"ok"),
        ("events.raw.dlq", b"bad!"),
        ("out", b"ok"),
    ]
    headers = dict(result.outputs[1].headers)
    assert headers[DLQ_ERROR_CODE] == PROCESSOR_EXCEPTION.encode()
    assert headers[DLQ_MESSAGE] == b"ValueError: bad record at 1"
    assert headers[DLQ_STAGE] == b"process"


@pytest.mark.parametrize(
    ("returned", "complaint"),
    [
        ("not a list", "not a list of Output"),
        ([("out", b"k", b"v")], "not an Output"),
        ([Output("out", b"k", "text")], "str, not bytes"),
        ([Output("", b"k", b"v")], "is not a topic name"),
        ([Output("out", b"k", b"v", [("h", "text")])], "'h' value is str"),
        ([Output("out", b"k", b"v", [["h", b"v"]])], "not a (str, bytes) pair"),
        ([Output("out", None, b"x" * 101)], "more than 100"),
    ],
)
def test_malformed_outputs_dead_letter_the_record_instead_of_failing_in_the_producer(returned, complaint):
    result = run_processor(lambda batch: returned, [record(7)], max_record_bytes=100, now=lambda: NOW)
    assert result.dead_letters == 1
    (dead,) = result.outputs
    headers = dict(dead.headers)
    assert dead.topic == "events.raw.dlq"
    assert headers[DLQ_ERROR_CODE] == PROCESSOR_OUTPUT_INVALID.encode()
    assert complaint in headers[DLQ_MESSAGE].decode()


def test_check_outputs_accepts_well_formed_outputs():
    outputs = [Output("out", None, None), Output("out", b"k", b"v", [("h", b"")])]
    assert check_outputs(outputs, 1000) is outputs
    with pytest.raises(InvalidOutput):
        check_outputs((Output("out", None, None),), 1000)  # a tuple is not a list


def test_processor_errors_never_escape_but_interrupts_do():
    def broken(batch):
        raise RuntimeError("always")

    result = run_processor(broken, [record(0), record(1)], now=lambda: NOW)
    assert [o.topic for o in result.outputs] == ["events.raw.dlq"] * 2

    def interrupted(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_processor(interrupted, [record(0)])


# --- dead letters ----------------------------------------------------------------------------------------------
def test_dead_letter_keeps_key_value_and_headers_and_says_why_where_and_when():
    original = record(
        41,
        b"\x00garbage",
        topic="cdc.postgres.users",
        partition=3,
        headers=[("traceparent", TRACEPARENT), ("lp-dlq-error-code", b"OLD"), ("lp-retry-attempt", b"2"), ("x", None)],
    )
    dead = dead_letter(original, "CODE", "line one\nline two", NOW)
    assert (dead.topic, dead.key, dead.value, dead.source) == (
        "cdc.postgres.users" + DLQ_SUFFIX,
        original.key,
        original.value,
        original,
    )
    headers = dict(dead.headers)
    assert headers == {
        "traceparent": TRACEPARENT,  # the original's own headers stay (stale lp-dlq-/lp-retry- ones go)
        "x": b"",
        DLQ_ERROR_CODE: b"CODE",
        DLQ_RULE: b"",
        DLQ_FIELD: b"",
        DLQ_MESSAGE: b"line one line two",
        DLQ_STAGE: b"process",
        DLQ_ORIGINAL_TOPIC: b"cdc.postgres.users",
        DLQ_ORIGINAL_PARTITION: b"3",
        DLQ_ORIGINAL_OFFSET: b"41",
        DLQ_TIME: b"2026-03-01T12:30:15.123Z",
        DLQ_TRACE_ID: TRACE_ID.encode(),
        DLQ_ATTEMPT: b"0",
    }
    assert [name for name, _ in dead.headers].count(DLQ_ERROR_CODE) == 1


def test_dead_letter_trace_id_falls_back_to_the_batch_span_and_messages_are_bounded():
    dead = dead_letter(record(1), "CODE", "é" * 2000, NOW, trace_id="f" * 32)
    headers = dict(dead.headers)
    assert headers[DLQ_TRACE_ID] == b"f" * 32
    assert len(headers[DLQ_MESSAGE]) <= MAX_MESSAGE_BYTES
    assert headers[DLQ_MESSAGE].endswith(b"...")
    headers[DLQ_MESSAGE].decode("utf-8")  # not cut inside a character
    assert dict(dead_letter(record(1), "CODE", "m", NOW).headers)[DLQ_TRACE_ID] == b""


def test_a_dead_letter_too_large_for_the_broker_is_cut_to_fit_and_says_so():
    value = bytes(range(256)) * 40  # 10 KiB
    dead = dead_letter(record(value=value), PROCESSOR_OUTPUT_INVALID, "too big", NOW, max_record_bytes=4096)
    headers = dict(dead.headers)
    assert len(dead.value) + len(dead.key) + sum(len(k) + len(v) for k, v in dead.headers) <= 4096
    assert value.startswith(dead.value) and dead.value
    assert headers["lp-dlq-value-truncated-from"] == b"10240"
    assert headers["lp-dlq-value-sha256"] == hashlib.sha256(value).hexdigest().encode()
    fits = dead_letter(record(value=value), PROCESSOR_OUTPUT_INVALID, "fits", NOW, max_record_bytes=1_000_000)
    assert fits.value == value and "lp-dlq-value-truncated-from" not in dict(fits.headers)


def test_dead_letter_headers_read_back_with_the_one_parser():
    dead = dead_letter(record(9, headers=[("traceparent", TRACEPARENT)]), PROCESSOR_EXCEPTION, "boom", NOW)
    parsed = parse_dead_letter(dead.key, dead.value, dead.headers)
    assert (parsed.error_code, str(parsed.stage), parsed.original_topic, parsed.original_offset) == (
        PROCESSOR_EXCEPTION,
        "process",
        "events.raw",
        9,
    )
    assert parsed.trace_id == TRACE_ID and parsed.time == NOW.replace(microsecond=123000)


# --- trace context on outputs ----------------------------------------------------------------------------------
def test_outputs_keep_their_own_trace_context_else_take_their_sources_else_the_batch_span():
    fallback = [("traceparent", b"00-batch")]
    source = record(1, headers=[("traceparent", TRACEPARENT), ("tracestate", b"k=v"), ("other", b"x")])
    own = Output("out", None, b"v", [("traceparent", b"00-own")], source=source)
    assert headers_with_trace(own, fallback) == [("traceparent", b"00-own")]
    inherited = Output("out", None, b"v", [("h", b"1")], source=source)
    assert headers_with_trace(inherited, fallback) == [
        ("h", b"1"),
        ("traceparent", TRACEPARENT),
        ("tracestate", b"k=v"),
    ]
    orphan = Output("out", None, b"v", (("h", b"1"),))
    assert headers_with_trace(orphan, fallback) == [("h", b"1"), ("traceparent", b"00-batch")]
    untraced_source = Output("out", None, b"v", source=record(2))
    assert headers_with_trace(untraced_source, fallback) == fallback
    assert trace_headers(source) == [("traceparent", TRACEPARENT), ("tracestate", b"k=v")]


# --- batches and topics ----------------------------------------------------------------------------------------
def test_batch_of_groups_by_topic_in_order_and_commits_past_the_highest_offset():
    records = [record(5, partition=1), record(2, topic="cdc"), record(6, partition=1), record(3, partition=0)]
    batch = Batch.of(records)
    assert batch.size == 4
    assert {t: [r.offset for r in rs] for t, rs in batch.by_topic.items()} == {"events.raw": [5, 6, 3], "cdc": [2]}
    assert batch.next_offsets == {("events.raw", 1): 7, ("cdc", 0): 3, ("events.raw", 0): 4}


def test_aiokafka_consumer_records_are_input_records():
    from aiokafka.structs import ConsumerRecord

    fetched = ConsumerRecord("t", 0, 1, 1700000000000, 0, b"k", b"v", None, 1, 1, (("traceparent", TRACEPARENT),))
    result = run_processor(copy_to("out"), [fetched])
    assert result.outputs == [Output("out", b"k", b"v", source=fetched)]
    assert trace_headers(fetched) == [("traceparent", TRACEPARENT)]


def test_input_patterns_expand_against_the_broker_and_skip_dead_letter_topics():
    existing = ["events.raw", "cdc.postgres.users", "cdc.postgres.users.dlq", "cdc.postgres.products", "__consumer"]
    assert resolve_input_topics(["events.raw", "cdc.postgres.*"], existing) == [
        "events.raw",
        "cdc.postgres.products",
        "cdc.postgres.users",
    ]
    assert resolve_input_topics(["events.raw", "events.*"], existing) == ["events.raw"]  # no duplicates
    with pytest.raises(TopicsMissing, match=r"events\.missing, cdc\.mysql\.\* \(no topic matches\)"):
        resolve_input_topics(["events.missing", "cdc.mysql.*", "events.raw"], existing)


def test_required_outputs_are_each_inputs_dead_letter_topic_and_the_declared_ones():
    assert required_output_topics(["a", "b"], ["out", "a.dlq"]) == ["a.dlq", "b.dlq", "out"]


def test_settings_split_topic_lists():
    settings = StreamRuntimeSettings(
        kafka_bootstrap_servers="k:9092", input_topics=" events.raw, cdc.postgres.* ,", output_topics=""
    )
    assert settings.input_patterns() == ["events.raw", "cdc.postgres.*"]
    assert settings.declared_outputs() == []


# --- loading a processor ---------------------------------------------------------------------------------------
def test_load_processor_forms(monkeypatch):
    module = SimpleNamespace(
        function=copy_to("out"),
        factory=lambda: copy_to("built"),
        engine=SimpleNamespace(process=copy_to("engine")),
        number=3,
    )
    monkeypatch.setitem(__import__("sys").modules, "fake_processors", module)
    assert load_processor("fake_processors:function")([record()])[0].topic == "out"
    assert load_processor("fake_processors:factory()")([record()])[0].topic == "built"
    assert load_processor("fake_processors:engine")([record()])[0].topic == "engine"
    with pytest.raises(TypeError, match="not callable"):
        load_processor("fake_processors:number")
    for spec in ("fake_processors", "fake_processors:", "fake_processors:a.b", ":function"):
        with pytest.raises(ValueError, match=r"package\.module:name"):
            load_processor(spec)
