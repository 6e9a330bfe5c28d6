import json

from opentelemetry import trace

from services.kit.tracing import extract_context, inject_headers, setup_tracing, shutdown_tracing, trace_id_of


def test_context_round_trips_through_kafka_headers(tmp_path):
    tracer = setup_tracing("test-producer", traces_file=str(tmp_path / "spans.jsonl"))
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
    trace.get_tracer_provider().force_flush()
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert {s["name"] for s in spans} >= {"produce", "consume"}
    assert {s["trace_id"] for s in spans} == {producer_trace}
    shutdown_tracing()
