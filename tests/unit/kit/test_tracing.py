import json

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.kit.tracing import (
    JsonLinesSpanExporter,
    extract_context,
    inject_headers,
    setup_tracing,
    span_processors,
    trace_id_of,
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
