"""OpenTelemetry tracing with W3C trace context carried in Kafka headers.

A producer injects `traceparent` (and `tracestate`) into each record's headers; a consumer extracts it and
starts its span as a child, so one trace follows a record across services. Spans go to an OTLP/HTTP endpoint
(Grafana Tempo in production) and/or a JSON-lines file (local runs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from threading import Lock

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.kit.kafka import Headers

_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object a line (enough to follow a trace locally)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "trace_id": f"{ctx.trace_id:032x}",
                        "span_id": f"{ctx.span_id:016x}",
                        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock, self.path.open("a") as out:
            out.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    traces_file: str | None = None,
    sample_ratio: float = 1.0,
) -> trace.Tracer:
    """Install the global tracer provider once per process and return a tracer for `service_name`."""
    global _provider
    if _provider is None:
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        for processor in span_processors(otlp_endpoint, traces_file):
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _provider = provider
    return trace.get_tracer(service_name)


def span_processors(otlp_endpoint: str | None, traces_file: str | None) -> list[BatchSpanProcessor]:
    """Where finished spans go: the OTLP/HTTP endpoint (Tempo) and/or a JSON-lines file."""
    processors = []
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if traces_file:
        processors.append(BatchSpanProcessor(JsonLinesSpanExporter(traces_file)))
    return processors


def shutdown_tracing() -> None:
    """Flush buffered spans (call on SIGTERM before exit)."""
    if _provider is not None:
        _provider.shutdown()


def inject_headers(headers: Headers | None = None, ctx: context.Context | None = None) -> Headers:
    """Return `headers` plus the W3C trace context of `ctx` (default: the current span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    out = list(headers or [])
    out.extend((k, v.encode()) for k, v in carrier.items())
    return out


def extract_context(headers: Sequence[tuple[str, bytes | None]] | None) -> context.Context:
    """The trace context a producer put in a record's headers (an empty context if none)."""
    carrier = {}
    for key, value in headers or ():
        if key in ("traceparent", "tracestate") and value is not None:
            carrier[key] = value.decode("latin-1")
    return propagate.extract(carrier)


def trace_id_of(ctx: context.Context | None = None) -> str | None:
    span_context = trace.get_current_span(ctx).get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else None
