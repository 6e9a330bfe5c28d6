"""The CDC service: PostgreSQL changes (users, products, transactions) to Kafka through the Debezium embedded engine.

Flow: preflight (PostgreSQL ready for logical replication, topics declared) -> JVM in the main thread -> engine in
a worker thread -> for every batch: produce each record to its `cdc.postgres.<table>` topic, keyed by the primary
key, with `traceparent`, `lp-cdc-lsn` and `lp-cdc-op` headers, then flush; only then does Debezium mark the batch
processed and commit its offsets (every `offset.flush.interval.ms`). A failed flush stops the engine before that
commit, so nothing is lost; what a crash replays carries the same `source.lsn`, the downstream dedupe key.

The kit's `Service.run()` frame fits as is: `start()` runs in the main thread (JVM start), `step()` watches the
engine and the health of the pipeline, `stop()` closes the engine (which finishes the batch in progress and
commits) and writes the report.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from services.cdc.connector import (
    ConnectorConfigError,
    captured_tables,
    heartbeat_topic,
    load_properties,
    local_properties,
    table_topics,
)
from services.cdc.engine import ChangeRecord, EmbeddedEngine, jvm_options, require_engine_packages, start_jvm
from services.cdc.preflight import PreflightError, PreflightReport, connect, run_preflight
from services.cdc.settings import CdcSettings
from services.cdc.slots import drop_slot
from services.contracts.envelope import (
    OP,
    OP_DELETE,
    SNAPSHOT_MARKERS,
    SOURCE,
    SOURCE_LSN,
    SOURCE_SNAPSHOT,
    SOURCE_TABLE,
    TOMBSTONE_OP,
)
from services.contracts.headers import CDC_LSN, CDC_OP
from services.kit.dependencies import DependencyUnavailable, dsn_address, wait_for_tcp
from services.kit.exits import ExitCode
from services.kit.extras import LocalExtraMissing
from services.kit.kafka import KafkaProducer, client_config, cluster_id, topic_exists, wait_for_broker
from services.kit.metrics import LATENCY_BUCKETS, STAGE_RECORDS_OUT
from services.kit.service import Service
from services.kit.tracing import (
    MAX_LINKS,
    TRACEPARENT,
    message_sampled,
    producer_span,
    traceparent,
    unsampled_headers,
)

EVENTS = PromCounter("lp_cdc_events_total", "Change events produced to Kafka", ["table", "op"])
HEARTBEATS = PromCounter("lp_cdc_heartbeats_total", "Debezium heartbeat records produced")
BATCH_SECONDS = Histogram(
    "lp_cdc_batch_seconds", "Handling one engine batch: produce and flush", buckets=LATENCY_BUCKETS
)
PRODUCE_LATENCY = Histogram(
    "lp_cdc_produce_latency_seconds", "produce() to broker acknowledgement", buckets=LATENCY_BUCKETS
)
LAST_LSN = Gauge("lp_cdc_last_lsn", "source.lsn of the last change event flushed to Kafka")
SLOT_LAG = Gauge("lp_cdc_slot_lag_bytes", "WAL between the server's current position and the slot's confirmed flush")
STREAMING = Gauge("lp_cdc_streaming", "1 once the initial snapshot is done and changes stream")
ENGINE_UP = Gauge("lp_cdc_engine_running", "1 while the Debezium engine runs")


class CdcFailed(RuntimeError):
    """The engine stopped on its own with an error (connector failure or a batch that could not be delivered)."""


@dataclass
class CdcPlan:
    """Everything decided before the JVM starts."""

    properties: dict[str, str]
    topics: dict[str, str]  # schema.table -> topic
    heartbeat_topic: str
    preflight: PreflightReport
    resume: bool = False  # offsets exist: no snapshot, stream from the committed position


def prepare(settings: CdcSettings) -> CdcPlan:
    """Resolve the connector properties, check PostgreSQL, then the Kafka topics. Raises PreflightError (one line)."""
    try:
        variables = settings.connector_variables()
        shared = load_properties(settings.cdc_connector_properties)
        properties = local_properties(shared, variables, settings.offsets_file)
        topics = table_topics(properties)
        heartbeat = heartbeat_topic(properties)
    except (ConnectorConfigError, ValueError) as error:
        raise PreflightError(str(error)) from None
    kafka = client_config(settings)
    try:
        wait_for_broker(kafka, timeout=settings.dependency_wait_s)
    except ConnectionError as error:
        raise PreflightError(str(error)) from None
    forget_offsets_of_another_cluster(settings, properties["slot.name"], cluster_id(kafka))
    dsn = settings.postgres_dsn.get_secret_value()
    if (address := dsn_address(dsn)) is not None:
        try:
            wait_for_tcp("POSTGRES_DSN", "{}:{}".format(*address), [address], settings.dependency_wait_s)
        except DependencyUnavailable as error:
            raise PreflightError(str(error)) from None
    resume = settings.offsets_file.exists() and settings.offsets_file.stat().st_size > 0
    report = run_preflight(
        settings.postgres_dsn.get_secret_value(),
        captured_tables(properties),
        properties["publication.name"],
        properties["slot.name"],
        offsets_present=resume,
    )
    missing = [t for t in [*topics.values(), heartbeat] if not topic_exists(kafka, t)]
    if missing:
        raise PreflightError(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found: apply the declarations first "
            "(python -m services.declarations apply)"
        )
    return CdcPlan(properties, topics, heartbeat, report, resume)


def forget_offsets_of_another_cluster(settings: CdcSettings, slot: str, cluster: str) -> None:
    """Start over (snapshot, new slot) if the offsets file was written while feeding another Kafka cluster.

    The offsets say which changes already reached Kafka; on a different cluster (locally: a broker restarted
    with an empty in-memory log) they did not, and resuming would leave the CDC topics without the rows
    captured before, e.g. the validator's users and products. The cluster id is kept beside the offsets."""
    marker = settings.offsets_file.with_name(settings.offsets_file.name + ".cluster")
    recorded = marker.read_text().strip() if marker.exists() else None
    if settings.offsets_file.exists() and recorded is not None and recorded != cluster:
        logging.getLogger("services.cdc").warning(
            "offsets belong to another Kafka cluster: starting over with a snapshot",
            extra={"offsets_cluster": recorded, "kafka_cluster": cluster, "slot": slot},
        )
        settings.offsets_file.unlink()
        with psycopg.connect(settings.postgres_dsn.get_secret_value(), autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is not None and (row[0] or drop_slot(conn, slot) is not None):
                raise PreflightError(f"replication slot {slot} is in use by another process: cannot start over")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(cluster + "\n")


class CdcService(Service[CdcSettings]):
    def __init__(self, settings: CdcSettings, plan: CdcPlan) -> None:
        super().__init__(settings)
        self.plan = plan
        self.table_of_topic = {topic: table.split(".", 1)[1] for table, topic in plan.topics.items()}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.heartbeats = 0
        self.last_lsn: int | None = None
        self.streaming = False
        self.started = time.monotonic()
        self.first_event_at: float | None = None
        self.last_record_at = time.monotonic()
        self.batch_started_at: float | None = None
        self._last_delete: dict[tuple[str, str], int] = {}  # (topic, key) -> lsn, for the tombstone that follows
        self._lag_checked = 0.0
        self._lag_conn: psycopg.Connection[Any] | None = None
        self.engine: EmbeddedEngine | None = None
        self._failure_raised = False
        self._closed_while_running = False

    # --- the kit's frame ---------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        self.producer = KafkaProducer(
            client_config(s),
            # The Java client's partitioner (murmur2): a key lands in the partition Debezium Server would pick.
            partitioner="murmur2_random",
            **{"message.timeout.ms": int(s.cdc_flush_timeout_s * 1000)},
        )
        self.producer.stats.latency.histogram = PRODUCE_LATENCY
        for topic in [*self.plan.topics.values(), self.plan.heartbeat_topic]:
            self.producer.warm_up(topic)
        s.offsets_file.parent.mkdir(parents=True, exist_ok=True)
        options = jvm_options(s.cdc_jvm_heap_mb, s.service_name, s.log_level, s.log_format)
        started = time.monotonic()
        start_jvm([*options, *shlex.split(s.cdc_jvm_options)])
        self.engine = EmbeddedEngine(self.plan.properties, self.handle_batch)
        self.engine.start()
        ENGINE_UP.set(1)
        self.health.add_check("engine", self._engine_problem)
        self.log.info(
            "capturing",
            extra={
                "topics": self.plan.topics,
                "slot": self.plan.properties["slot.name"],
                "publication": self.plan.properties["publication.name"],
                "offsets_file": str(s.offsets_file),
                "start": "resume from offsets" if self.plan.resume else "initial snapshot, then stream",
                "jvm_start_s": round(time.monotonic() - started, 2),
            },
        )

    def step(self) -> bool:
        assert self.engine is not None
        self.stopping.wait(0.5)
        if not self.engine.running:
            ENGINE_UP.set(0)
            self._raise_if_failed()
            self.log.info("engine finished on its own", extra={"outcome": str(self.engine.outcome)})
            return False
        if self._stall() is None:
            self.health.beat()
        self._update_slot_lag()
        return True

    def stop(self) -> None:
        if self.engine is not None:
            self._closed_while_running = self.engine.running
            # Finishes the batch in progress (its flush included), commits the offsets of finished batches.
            self.engine.close(timeout=max(1.0, self.settings.shutdown_timeout_s - 2))
            ENGINE_UP.set(0)
        if self._lag_conn is not None:
            self._lag_conn.close()
        if hasattr(self, "producer"):
            self.producer.flush(self.settings.cdc_flush_timeout_s)  # nothing pending normally: batches flush
        report = self.report()
        self.log.info("finished", extra=report)
        if self.settings.report_file:
            self.settings.report_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings.report_file.write_text(json.dumps(report, indent=2))
        if not self._failure_raised:  # e.g. a flush that failed while SIGTERM was closing the engine
            self._raise_if_failed()

    # --- the batch handler (Debezium's thread) -----------------------------------------------------------------
    def handle_batch(self, records: list[ChangeRecord]) -> None:
        now = time.monotonic()
        self.batch_started_at = now
        counts: Counter[tuple[str, str]] = Counter()
        heartbeats = 0
        last_lsn = self.last_lsn
        with self.tracer.start_as_current_span("cdc.batch") as span:
            base_headers = unsampled_headers(span.get_span_context())  # a sampled change gets its own trace
            links = 0
            for topic, key, value in records:
                if topic == self.plan.heartbeat_topic:
                    self.producer.produce(topic, value.encode() if value is not None else None, key, base_headers)
                    heartbeats += 1
                    self.streaming = True  # heartbeats come from the streaming phase (also after an empty snapshot)
                    continue
                table = self.table_of_topic.get(topic, topic)
                if value is None:  # the tombstone after a delete: same key, same LSN as that delete
                    lsn = self._last_delete.pop((topic, key or ""), None)
                    op = TOMBSTONE_OP
                else:
                    envelope = json.loads(value)
                    source = envelope.get(SOURCE) or {}
                    lsn, op = source.get(SOURCE_LSN), envelope.get(OP) or "?"
                    table = source.get(SOURCE_TABLE) or table
                    if op == OP_DELETE:
                        self._last_delete[(topic, key or "")] = lsn
                    snapshot = source.get(SOURCE_SNAPSHOT)
                    if snapshot == "last" or snapshot not in SNAPSHOT_MARKERS:
                        self.streaming = True
                send = None
                if message_sampled():
                    send = producer_span(self.tracer, topic, attributes={"lp.cdc.op": op, "lp.cdc.table": table})
                    headers = [(TRACEPARENT, traceparent(send.get_span_context())), (CDC_OP, op.encode())]
                    if links < MAX_LINKS:
                        span.add_link(send.get_span_context())
                        links += 1
                else:
                    headers = [*base_headers, (CDC_OP, op.encode())]
                if lsn is not None:
                    headers.append((CDC_LSN, str(lsn).encode()))
                    last_lsn = lsn
                self.producer.produce(topic, value.encode() if value is not None else None, key, headers)
                if send is not None:
                    send.end()
                counts[(table, op)] += 1
            # Before returning: Debezium commits the batch's offsets as soon as this handler returns.
            self.producer.flush(self.settings.cdc_flush_timeout_s)
            span.set_attribute("messaging.batch.message_count", len(records))
            span.set_attribute("lp.cdc.heartbeats", heartbeats)
            if last_lsn is not None:
                span.set_attribute("lp.cdc.last_lsn", last_lsn)
        for (table, op), n in counts.items():
            EVENTS.labels(table, op).inc(n)
        STAGE_RECORDS_OUT.labels("cdc").inc(sum(counts.values()))
        self.counts.update(counts)
        if heartbeats:
            HEARTBEATS.inc(heartbeats)
            self.heartbeats += heartbeats
        if counts and self.first_event_at is None:
            self.first_event_at = now
        if last_lsn is not None:
            self.last_lsn = last_lsn
            LAST_LSN.set(last_lsn)
        STREAMING.set(1 if self.streaming else 0)
        BATCH_SECONDS.observe(time.monotonic() - now)
        self.last_record_at = time.monotonic()
        self.batch_started_at = None

    # --- health ------------------------------------------------------------------------------------------------
    def _stall(self) -> str | None:
        """Why the pipeline looks stuck (liveness), or None."""
        limit = self.settings.cdc_stall_after_s
        now = time.monotonic()
        if self.batch_started_at is not None and now - self.batch_started_at > limit:
            return f"a batch has been in progress for {now - self.batch_started_at:.0f}s (Kafka flush stuck?)"
        # Heartbeats arrive every interval even when nothing changes, so silence means a stuck engine.
        quiet_limit = max(limit, 3 * self.settings.cdc_heartbeat_interval_ms / 1000)
        if self.engine is not None and self.engine.task_started.is_set() and now - self.last_record_at > quiet_limit:
            return f"no record (not even a heartbeat) for {now - self.last_record_at:.0f}s"
        return None

    def _engine_problem(self) -> str | None:
        if self.engine is None or not self.engine.running:
            return "engine not running"
        return self._stall()

    def _raise_if_failed(self) -> None:
        if self.engine is None:
            return
        outcome = self.engine.outcome
        self._failure_raised = True
        if self.engine.handler_error is not None:
            raise CdcFailed(f"batch delivery failed, offsets not committed: {self.engine.handler_error}")
        if outcome is not None and not outcome.success:
            if self._closed_while_running:
                # SIGTERM while the engine was still starting: Debezium reports the interrupted start-up as a
                # failure, but nothing was processed or committed, so this is a clean stop.
                self.log.warning("engine start-up interrupted by shutdown", extra={"engine": outcome.message})
                return
            raise CdcFailed(f"Debezium engine stopped: {outcome.message}")

    def _update_slot_lag(self) -> None:
        """lp_cdc_slot_lag_bytes every 5 s: how far the committed position trails the server's WAL."""
        now = time.monotonic()
        if now - self._lag_checked < 5:
            return
        self._lag_checked = now
        try:
            if self._lag_conn is None or self._lag_conn.closed:
                self._lag_conn = connect(
                    self.settings.postgres_dsn.get_secret_value(), connect_timeout=2, application_name="lp-cdc-lag"
                )
            row = self._lag_conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.plan.properties["slot.name"],),
            ).fetchone()
        except (psycopg.Error, PreflightError) as error:
            self.log.warning("cannot read the slot lag", extra={"error": str(error)})
            if self._lag_conn is not None:
                self._lag_conn.close()
            self._lag_conn = None
            return
        if row is not None and row[0] is not None:
            SLOT_LAG.set(float(row[0]))

    # --- report ------------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        by_table: dict[str, dict[str, int]] = {}
        for (table, op), n in sorted(self.counts.items()):
            by_table.setdefault(table, {})[op] = n
        total = sum(n for (_, op), n in self.counts.items() if op != TOMBSTONE_OP)
        busy = time.monotonic() - self.first_event_at if self.first_event_at else 0.0
        return {
            "events_by_table": by_table,
            "events": total,
            "tombstones": sum(n for (_, op), n in self.counts.items() if op == TOMBSTONE_OP),
            "heartbeats": self.heartbeats,
            "records_delivered": self.producer.stats.delivered if hasattr(self, "producer") else 0,
            "last_lsn": self.last_lsn,
            "streaming": self.streaming,
            "slot": self.plan.properties["slot.name"],
            "duration_s": round(elapsed, 3),
            "produce_latency_ms": self.producer.stats.latency.percentiles_ms() if hasattr(self, "producer") else None,
            "events_per_s_since_first": round(total / busy, 1) if busy > 0 else None,
        }


def run_service(settings: CdcSettings) -> int:
    """Preflight (one clear line and exit 1 on failure), then the service frame."""
    log = logging.getLogger(settings.service_name)
    try:
        require_engine_packages()
    except LocalExtraMissing as error:  # a production image pointed at the local runner: nothing was touched
        log.error("cannot start: %s", error)
        return ExitCode.CONFIG
    try:
        plan = prepare(settings)
    except PreflightError as error:
        log.error("preflight failed: %s", error, extra={"preflight": "failed"})
        return ExitCode.FAILED
    return CdcService(settings, plan).run()
