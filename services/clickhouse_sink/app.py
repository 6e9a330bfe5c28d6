"""The ClickHouse sink service: processed topics -> ClickHouse speed-layer tables, exactly once.

`python -m services.clickhouse_sink` consumes `events.processed` and `transactions.processed` with the kit's
`SinkRunner` (batching, backpressure, dead letters, commits after the insert) and writes through
`ClickHouseSink` (dedup tokens, columnar inserts, latency). Refused records go to
`<topic>.clickhouse.dlq`. While it runs it serves the live views on its query port; on SIGTERM it flushes,
commits and writes `CLICKHOUSE_SINK_REPORT_FILE` (rows per table, event-to-visible percentiles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.clickhouse_sink.query_server import QueryServer
from services.clickhouse_sink.settings import ClickHouseSinkSettings
from services.clickhouse_sink.sink import ClickHouseSink
from services.clickhouse_sink.tables import EVENTS, TRANSACTIONS
from services.contracts.sinks import ContractSinkService
from services.kit.sink import Sink
from services.stores import clickhouse_queries as queries
from services.stores.clickhouse import make_client, wait_for_server


class ClickHouseSinkService(ContractSinkService[ClickHouseSinkSettings]):
    sink: ClickHouseSink
    query_server: QueryServer | None = None

    def subjects(self) -> dict[str, str]:
        s = self.settings
        topics = {s.clickhouse_sink_events_topic: EVENTS.subject}
        if s.clickhouse_sink_transactions_topic:
            topics[s.clickhouse_sink_transactions_topic] = TRANSACTIONS.subject
        return topics

    def make_sink(self) -> Sink:
        s = self.settings
        if s.clickhouse_cluster and s.clickhouse_client == "chdb":
            raise ValueError("CLICKHOUSE_CLUSTER needs CLICKHOUSE_CLIENT=native (chDB is a single local engine)")
        wait_for_server(s, s.dependency_wait_s)
        specs = {s.clickhouse_sink_events_topic: EVENTS}
        if s.clickhouse_sink_transactions_topic:
            specs[s.clickhouse_sink_transactions_topic] = TRANSACTIONS
        return ClickHouseSink(
            make_client(s),
            s.clickhouse_database,
            specs,
            cluster=s.clickhouse_cluster,
            scratch_dir=s.clickhouse_sink_scratch_dir,
            latency_sample_every=s.clickhouse_sink_latency_sample_every,
            fault_file=s.clickhouse_sink_fault_file,
            kill_after_inserts=s.clickhouse_sink_kill_after_inserts,
            schemas=self.schemas,  # the service's, with the schema store's resolver: newer writers decode too
        )

    def after_start(self) -> None:
        s = self.settings
        # A server that hangs shows in /readyz within HEALTH_PROBE_TIMEOUT_S (native; chDB is in-process).
        self.health.add_check("clickhouse", self.sink.client.probe)
        if s.clickhouse_sink_query_port >= 0:
            self.query_server = QueryServer(
                self.sink.client.rows, s.clickhouse_database, s.clickhouse_sink_query_host, s.clickhouse_sink_query_port
            ).start()
            self.log.info(
                "live queries on http://%s:%d/query?name=%s",
                s.clickhouse_sink_query_host,
                self.query_server.port,
                "|".join(queries.QUERIES),
                extra={"query_port": self.query_server.port},
            )

    def on_drained(self) -> None:
        """The report reads the tables, so it comes before the store is closed."""
        try:
            if self.settings.clickhouse_sink_report_file is not None:
                self.write_report(self.settings.clickhouse_sink_report_file)
        finally:
            if self.query_server is not None:
                self.query_server.stop()

    def report(self) -> dict[str, Any]:
        runner = getattr(self, "runner", None)
        out: dict[str, Any] = {
            "event_to_visible_ms": self.sink.latency_percentiles(),
            "latency_samples": self.sink.latency_counts(),
        }
        if runner is not None:
            out |= {
                "rows_written": runner.stats.written,
                "rows_rejected": runner.stats.rejected,
                "batches": runner.stats.batches,
                "backpressure_retries": runner.stats.backpressure,
                "uncommitted_at_close": runner.stats.uncommitted_at_close,
            }
        try:
            out["tables"] = queries.counts_dict(
                queries.counts(self.sink.client.rows, self.settings.clickhouse_database)
            )
        except Exception as error:  # the store may be down at shutdown: the report still says what is known
            out["tables"] = None
            out["tables_error"] = f"{type(error).__name__}: {error}"
        return out

    def write_report(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2, default=str) + "\n")
        self.log.info("report written to %s", path)
