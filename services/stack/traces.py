"""One event's trace from the spans a local run wrote (`python -m services.stack trace <event id or trace id>`).

Every service of `make run` appends its finished spans to `<state dir>/traces/spans.jsonl` (kit/tracing.py's
JSON-lines exporter). A sampled event's trace is a tree: the producer's `send` span, then each consumer's
`process` span as a child of the hop before, down to the sinks (or a dead-letter `send <topic>.dlq` span).
Batch spans (a write, a validator batch) live in traces of their own and link to the messages they carry;
they are shown under the span they link to. The Snowflake load cannot link (the lake keeps no headers): its
`load <table>` span names the offset ranges it loaded, matched here with the archiver's `process` span.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.kit.tracing import DESTINATION, MESSAGE_ID, OFFSET, PARTITION

DEMO_SAMPLE_RATIO = "0.01"  # `make run` traces one event in a hundred unless OTEL_SAMPLE_RATIO is set
LAKE_WRITER = "archiver"  # the sink whose writes the Snowflake loader loads


def traces_file(state_dir: Path) -> Path:
    return state_dir / "traces" / "spans.jsonl"


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span in the file; a line cut short by a service killed mid-write is skipped."""
    spans = []
    with path.open() as lines:
        for line in lines:
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return spans


@dataclass
class Node:
    span: dict[str, Any]
    children: list[Node] = field(default_factory=list)
    linked: list[dict[str, Any]] = field(default_factory=list)  # batch spans of other traces linking here


@dataclass
class Trace:
    trace_id: str
    spans: list[dict[str, Any]]
    roots: list[Node]
    start_ns: int

    def walk(self) -> Iterator[tuple[int, Node]]:
        stack = [(0, root) for root in reversed(self.roots)]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack.extend((depth + 1, child) for child in reversed(node.children))


def trace_id_for(spans: Iterable[dict[str, Any]], wanted: str) -> str | None:
    """`wanted` itself if it is a trace id in the file, else the trace of the span whose message id it is."""
    wanted = wanted.strip().lower()
    by_message = None
    for span in spans:
        if span["trace_id"] == wanted:
            return wanted
        if by_message is None and str(span.get("attributes", {}).get(MESSAGE_ID, "")).lower() == wanted:
            by_message = span["trace_id"]
    return by_message


def build_trace(spans: list[dict[str, Any]], trace_id: str) -> Trace:
    own = sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start_ns"])
    nodes = {s["span_id"]: Node(s) for s in own}
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.span["parent_id"] or "")
        (parent.children if parent is not None else roots).append(node)
    for span in spans:
        if span["trace_id"] == trace_id:
            continue
        for link in span.get("links", ()):
            if link["trace_id"] == trace_id and link["span_id"] in nodes:
                nodes[link["span_id"]].linked.append(span)
    _attach_loads(spans, nodes)
    start = min((s["start_ns"] for s in own), default=0)
    return Trace(trace_id, own, roots, start)


def _attach_loads(spans: list[dict[str, Any]], nodes: dict[str, Node]) -> None:
    """Loads whose offset ranges hold a record the archiver's `process` span of the trace consumed (the loader
    reads what the archiver wrote to the lake)."""
    loads = [s for s in spans if "lp.loader.offsets" in s.get("attributes", {})]
    if not loads:
        return
    for node in nodes.values():
        attributes = node.span.get("attributes", {})
        if OFFSET not in attributes or attributes.get("lp.sink") != LAKE_WRITER:
            continue
        where = (attributes.get(DESTINATION), str(attributes.get(PARTITION)), int(attributes[OFFSET]))
        for load in loads:
            for entry in load["attributes"]["lp.loader.offsets"]:
                topic, partition, bounds = str(entry).rsplit(":", 2)
                low, high = (int(x) for x in bounds.split("-"))
                if (topic, partition) == where[:2] and low <= where[2] < high:
                    node.linked.append(load)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:,.1f} ms"


def _offset(ns: int) -> str:
    return f"{ns / 1e6:+,.1f} ms"


def _details(span: dict[str, Any]) -> str:
    attributes = span.get("attributes", {})
    parts = []
    if PARTITION in attributes:
        parts.append(f"partition {attributes[PARTITION]} offset {attributes.get(OFFSET)}")
    if "messaging.consumer.group.name" in attributes:
        parts.append(f"group {attributes['messaging.consumer.group.name']}")
    if MESSAGE_ID in attributes:
        parts.append(f"id {attributes[MESSAGE_ID]}")
    if "lp.dlq.code" in attributes:
        parts.append(f"DEAD LETTER {attributes['lp.dlq.code']} ({attributes.get('lp.dlq.rule') or 'no rule'})")
    if "lp.sink" in attributes and span.get("kind") != "INTERNAL":
        parts.append(f"sink {attributes['lp.sink']}")
    return f"  [{', '.join(parts)}]" if parts else ""


def format_trace(found: Trace) -> str:
    end = max((s["end_ns"] for s in found.spans), default=found.start_ns)
    services = sorted({s["service"] for s in found.spans})
    lines = [
        f"trace {found.trace_id}: {len(found.spans)} spans over {len(services)} services, "
        f"{_ms(end - found.start_ns)} from the first span's start to the last one's end",
        f"{'start':>12}  {'duration':>11}  {'service':<18} span",
    ]
    for depth, node in found.walk():
        span = node.span
        lines.append(
            f"{_offset(span['start_ns'] - found.start_ns):>12}  {_ms(span['end_ns'] - span['start_ns']):>11}  "
            f"{span['service'] or '?':<18} {'  ' * depth}{span['name']}{_details(span)}"
        )
        for linked in node.linked:
            lines.append(
                f"{_offset(linked['start_ns'] - found.start_ns):>12}  "
                f"{_ms(linked['end_ns'] - linked['start_ns']):>11}  {linked['service'] or '?':<18} "
                f"{'  ' * (depth + 1)}~ {linked['name']} (batch span, linked; trace {linked['trace_id'][:8]}...)"
            )
    return "\n".join(lines)


def list_traces(spans: list[dict[str, Any]], limit: int = 20) -> str:
    """The per-message traces in the file (those starting with a `send` span), newest last."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    rows = []
    for trace_id, own in by_trace.items():
        ids = {s["span_id"] for s in own}
        roots = [s for s in own if (s["parent_id"] or "") not in ids]
        if not any(r["name"].startswith("send ") and r.get("kind") == "PRODUCER" for r in roots):
            continue
        first = min(s["start_ns"] for s in own)
        message = next((s["attributes"][MESSAGE_ID] for s in own if MESSAGE_ID in s.get("attributes", {})), "-")
        dead = any("lp.dlq.code" in s.get("attributes", {}) for s in own)
        hops = " > ".join(dict.fromkeys(s["service"] for s in sorted(own, key=lambda s: s["start_ns"])))
        rows.append((first, f"{trace_id}  {message!s:<36}  {'DLQ ' if dead else ''}{hops}"))
    rows.sort()
    shown = rows[-limit:]
    header = f"{len(rows)} traced messages; the last {len(shown)} (trace id, event id, hops):"
    return "\n".join([header, *(row for _, row in shown)])
