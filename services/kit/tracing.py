"""OpenTelemetry tracing with W3C trace context carried in Kafka headers.

A producer injects `traceparent` (and `tracestate`) into each record's headers; a consumer extracts it and
starts its span as a child, so one trace follows a record across services. Spans go to an OTLP/HTTP endpoint
(Grafana Tempo in production) and/or a JSON-lines file (local runs).

Per message (OpenTelemetry messaging semantic conventions, pinned at SEMCONV_VERSION): a producer draws, per
message, whether it is sampled (`message_sampled`, at OTEL_SAMPLE_RATIO); a sampled message gets a `send`
span of its own (PRODUCER, the root of the message's trace) and carries its context with the sampled flag; an
unsampled one carries the batch's context with the flag cleared (`unsampled_headers`), so every consumer tells
the two apart from the traceparent's flags byte alone (`sampled_context`) and spends no span on the unsampled.
Each consumer's `process` span (CONSUMER) is a child of the message's context; batch operations are one span
per batch with links to their sampled messages (at most MAX_LINKS).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from threading import Lock
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from services.kit.kafka import Headers

SEMCONV_VERSION = "1.44.0"  # the messaging conventions followed (still "Development" upstream)
MAX_LINKS = 32  # links of one batch span to its sampled messages
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Span attributes (semconv 1.44.0 messaging + Kafka).
MESSAGING_SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
PARTITION = "messaging.destination.partition.id"
OFFSET = "messaging.kafka.offset"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
BATCH_COUNT = "messaging.batch.message_count"
# Set by `producer_span` on a root the caller already drew as sampled; the root sampler honours and drops it.
_PRESAMPLED = "lp.presampled"
DEAD_LETTER_SAMPLED = False  # the sampled flag a dead letter's traceparent carries

_provider: TracerProvider | None = None
_message_ratio = 0.0  # share of messages sampled at their producer; 0 while no exporter is configured
_draw = random.random


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
                        "kind": span.kind.name,
                        "attributes": dict(span.attributes or {}),
                        "links": [
                            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
                            for link in span.links
                        ],
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
    global _provider, _message_ratio
    if _provider is None:
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(PresampledOrRatio(sample_ratio)),
        )
        # Without an exporter a span goes nowhere: no message is worth a span then.
        _message_ratio = sample_ratio if (otlp_endpoint or traces_file) else 0.0
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


# --- per-message tracing --------------------------------------------------------------------------------------


class PresampledOrRatio(Sampler):
    """Root sampler: TraceIdRatioBased, except for a per-message root its producer already drew as sampled
    (`message_sampled`): drawing again by trace id would sample ratio² of the messages."""

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if attributes and attributes.get(_PRESAMPLED):
            kept = {key: value for key, value in attributes.items() if key != _PRESAMPLED}
            return SamplingResult(Decision.RECORD_AND_SAMPLE, kept, trace_state)
        return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"PresampledOr{self._ratio.get_description()}"


def set_message_sample_ratio(ratio: float) -> None:
    """Override the per-message ratio (tests that install their own provider)."""
    global _message_ratio
    _message_ratio = ratio


def traces_messages() -> bool:
    """Whether this process spends anything on per-message spans: not at ratio 0 or without an exporter (then a
    consumer does not even scan headers, and contexts pass through unchanged)."""
    return _message_ratio > 0.0


def message_sampled() -> bool:
    """Whether the message about to be produced gets a trace of its own (one random draw, no span)."""
    ratio = _message_ratio
    return ratio >= 1.0 or (ratio > 0.0 and _draw() < ratio)


def traceparent(span_context: SpanContext, sampled: bool = True) -> bytes:
    """The W3C `traceparent` value of `span_context`, with the sampled flag set or cleared."""
    return b"00-%032x-%016x-%s" % (span_context.trace_id, span_context.span_id, b"01" if sampled else b"00")


def unsampled_headers(span_context: SpanContext) -> Headers:
    """Trace headers for messages that are not sampled: the batch's trace id (dead letters keep it), flag 00."""
    if not span_context.is_valid:
        return []
    return [(TRACEPARENT, traceparent(span_context, sampled=False))]


_SAMPLED_LAST_HEX_DIGIT = frozenset(b"13579bdfBDF")  # the flags byte's low bit (sampled) is set


def sampled_context(headers: Sequence[tuple[str, bytes | None]] | None) -> SpanContext | None:
    """The remote context of a record's `traceparent` if its sampled flag is set, else None. Parsed by hand
    (cheaper than the propagator); an unsampled record costs this header scan and no more."""
    for name, value in headers or ():
        if name == TRACEPARENT and value:
            if len(value) != 55 or value[54] not in _SAMPLED_LAST_HEX_DIGIT:  # 00-<32>-<16>-<flags>
                return None
            try:
                trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
            except ValueError:
                return None
            if not trace_id or not span_id or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
                return None
            return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return None


def with_traceparent(
    headers: Sequence[tuple[str, bytes | None]], span_context: SpanContext, sampled: bool = True
) -> Headers:
    """`headers` with their trace context replaced by `span_context`'s."""
    out: Headers = [(k, v) for k, v in headers if k not in (TRACEPARENT, TRACESTATE) and v is not None]
    out.append((TRACEPARENT, traceparent(span_context, sampled)))
    return out


def producer_span(
    tracer: trace.Tracer,
    topic: str,
    *,
    parent: SpanContext | None = None,
    message_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """The `send <topic>` span (PRODUCER) of one sampled message: the root of its trace, or a child of
    `parent`. End it once the message is handed to the client."""
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: "kafka",
        DESTINATION: topic,
        OPERATION_TYPE: "send",
        OPERATION_NAME: "send",
    }
    if message_id:
        attrs[MESSAGE_ID] = message_id
    if attributes:
        attrs.update(attributes)
    if parent is None:
        attrs[_PRESAMPLED] = True
        ctx = context.Context()  # a root: the message's own trace
    else:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    return tracer.start_span(f"send {topic}", context=ctx, kind=SpanKind.PRODUCER, attributes=attrs)


def consumer_span(
    tracer: trace.Tracer,
    parent: SpanContext,
    topic: str,
    partition: int,
    offset: int,
    group: str | None,
    start_time: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """The `process <topic>` span (CONSUMER) of one sampled record, a child of its producer's context."""
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: "kafka",
        DESTINATION: topic,
        OPERATION_TYPE: "process",
        OPERATION_NAME: "process",
        PARTITION: str(partition),
        OFFSET: offset,
    }
    if group:
        attrs[CONSUMER_GROUP] = group
    if attributes:
        attrs.update(attributes)
    return tracer.start_span(
        f"process {topic}",
        context=trace.set_span_in_context(NonRecordingSpan(parent)),
        kind=SpanKind.CONSUMER,
        attributes=attrs,
        start_time=start_time,
    )


def batch_span(
    tracer: trace.Tracer,
    name: str,
    operation: str,
    sampled: Sequence[SpanContext],
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    """One span for a batch operation (a fetch, an insert, a commit): a root linked to its sampled messages
    (the first MAX_LINKS), as the conventions ask of batch operations."""
    attrs: dict[str, Any] = {MESSAGING_SYSTEM: "kafka", OPERATION_NAME: operation}
    if attributes:
        attrs.update(attributes)
    return tracer.start_span(
        name,
        context=context.Context(),
        kind=kind,
        links=[Link(c) for c in sampled[:MAX_LINKS]],
        attributes=attrs,
    )


def dead_letter_span(
    tracer: trace.Tracer, parent: SpanContext, topic: str, code: str, stage: str, rule: str | None = None
) -> Span:
    """The `send <topic>.dlq` span that ends a dead-lettered sampled record's trace (PRODUCER, child of the span
    that refused it). Its context goes in the dead letter's traceparent with the sampled flag cleared
    (`DEAD_LETTER_SAMPLED`): the dead letter keeps its trace id, and the trace ends here (archiving the dead
    letter adds no span)."""
    attributes: dict[str, Any] = {"lp.dlq.code": code, "lp.dlq.stage": stage, "lp.dead_letter": True}
    if rule:
        attributes["lp.dlq.rule"] = rule
    return producer_span(tracer, topic, parent=parent, attributes=attributes)
