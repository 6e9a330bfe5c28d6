import json

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import SpanContext, SpanKind

from services.kit.tracing import (
    JsonLinesSpanExporter,
    PresampledOrRatio,
    extract_context,
    inject_headers,
    message_sampled,
    producer_span,
    sampled_context,
    set_message_sample_ratio,
    setup_tracing,
    span_processors,
    trace_id_of,
    traceparent,
    unsampled_headers,
    with_traceparent,
)


def test_context_round_trips_through_kafka_headers(tmp_path):
    # The provider is process-wide (another test may have installed it): attach our exporter to whichever it is.
    tracer = setup_tracing("test-producer")
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(tmp_path / "s.jsonl")))
    with tracer.start_as_current_span("produce") as span:
        headers = inject_headers([("event-type", b"purchase")])
        producer_trace = f"{span.get_span_context().trace_id:032x}"
    names = [k for k, _ in headers]
    assert names[0] == "event-type" and "traceparent" in names
    ctx = extract_context(headers)
    assert trace_id_of(ctx) == producer_trace
    with tracer.start_as_current_span("consume", context=ctx) as child:
        assert f"{child.get_span_context().trace_id:032x}" == producer_trace
    # no header: a fresh, unrelated context
    assert trace_id_of(extract_context([("x", b"y")])) is None
    spans = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    ours = [s for s in spans if s["name"] in ("produce", "consume")]
    assert {s["name"] for s in ours} == {"produce", "consume"}
    assert {s["trace_id"] for s in ours} == {producer_trace}
    consume = next(s for s in ours if s["name"] == "consume")
    produce = next(s for s in ours if s["name"] == "produce")
    assert consume["parent_id"] == produce["span_id"]


def test_otlp_exporter_is_installed_and_targets_the_traces_path(tmp_path):
    processors = span_processors("http://tempo.observability:4318/", str(tmp_path / "spans.jsonl"))
    assert len(processors) == 2
    otlp = processors[0].span_exporter
    assert type(otlp).__name__ == "OTLPSpanExporter"
    assert otlp._endpoint == "http://tempo.observability:4318/v1/traces"
    assert isinstance(processors[1].span_exporter, JsonLinesSpanExporter)
    for processor in processors:
        processor.shutdown()
    assert span_processors(None, None) == []


def recording_tracer(ratio: float) -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(PresampledOrRatio(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_a_presampled_message_root_is_recorded_even_at_ratio_zero_and_other_roots_follow_the_ratio():
    tracer, exporter = recording_tracer(0.0)
    send = producer_span(tracer, "events.raw", message_id="e-1")
    send.end()
    tracer.start_span("generator.batch").end()  # an ordinary root: drawn at the ratio (0)
    (span,) = exporter.get_finished_spans()
    assert span.name == "send events.raw" and span.kind is SpanKind.PRODUCER and span.parent is None
    assert dict(span.attributes or {}) == {  # the sampler's marker is not kept
        "messaging.system": "kafka",
        "messaging.destination.name": "events.raw",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": "e-1",
    }
    header = traceparent(span.get_span_context())
    assert header == b"00-%032x-%016x-01" % (span.context.trace_id, span.context.span_id)


def test_only_a_sampled_flag_makes_a_sampled_context():
    sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    context = sampled_context([("lp-producer", b"generator"), ("traceparent", sampled)])
    assert context is not None and context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736 and context.is_remote
    assert sampled_context([("traceparent", sampled[:-2] + b"03")]) is not None  # another flag beside sampled
    unsampled = (sampled[:-2] + b"00", sampled[:-2] + b"02", sampled[:-1], sampled.replace(b"-", b"_"))
    for header in (*unsampled, b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"garbage"):
        assert sampled_context([("traceparent", header)]) is None
    assert sampled_context([]) is None
    batch = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=False)
    assert unsampled_headers(batch) == [("traceparent", sampled[:-2] + b"00")]  # the trace id, flag cleared
    assert with_traceparent([("traceparent", b"old"), ("tracestate", b"x"), ("k", b"v")], batch, sampled=False) == [
        ("k", b"v"),
        ("traceparent", sampled[:-2] + b"00"),
    ]


def test_message_sampling_follows_the_ratio():
    try:
        set_message_sample_ratio(0.0)
        assert not any(message_sampled() for _ in range(1000))
        set_message_sample_ratio(1.0)
        assert all(message_sampled() for _ in range(1000))
        set_message_sample_ratio(0.1)
        assert 700 < sum(message_sampled() for _ in range(10_000)) < 1300
    finally:
        set_message_sample_ratio(0.0)
