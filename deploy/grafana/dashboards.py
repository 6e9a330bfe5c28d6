"""The pipeline's Grafana dashboards as code (grafana-foundation-sdk), written as checked-in JSON.

    python -m deploy.grafana.dashboards          # rewrite the JSON files
    python -m deploy.grafana.dashboards --check  # exit 1 if a file differs from what this module builds

The files live under the chart (`deploy/helm/lambda-pipeline/files/grafana/`) so that its dashboard ConfigMaps
read them with `.Files.Glob`. Edit this module, never the JSON: a test compares them, another checks that every
metric an expression names is served by a service (docs/observability.md lists them). Datasources are referred to
by uid, `prometheus` and `tempo`: the uids the kind profile's Grafana and the chart's datasource ConfigMap provision.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import nodegraph, prometheus, stat, table, tempo, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueColorMode, LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "helm" / "lambda-pipeline" / "files" / "grafana"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")
TEMPO = DataSourceRef(type_val="tempo", uid="tempo")
RATE = "$__rate_interval"  # Grafana's window: at least four scrape intervals
TAGS = ["lambda-pipeline"]

Query = tuple[str, str]  # (PromQL expression, legend)


def accepted_share(window: str) -> str:
    """The data-quality score across every validator worker: accepted / decided (what LowDataQuality alerts on)."""
    verdicts = "lp_validator_verdicts_total"
    return f'sum(rate({verdicts}{{verdict="accepted"}}[{window}])) / sum(rate({verdicts}[{window}]))'


QUALITY_5M = accepted_share("5m")
QUALITY_NOW = accepted_share(RATE)


def quantile(q: float, histogram: str, by: str = "", selector: str = "") -> str:
    """histogram_quantile over every series of a histogram, kept apart by the `by` labels."""
    grouping = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({histogram}_bucket{selector}[{RATE}])))"


def _targets(queries: list[Query]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + index)).datasource(PROMETHEUS)
        for index, (expr, legend) in enumerate(queries)
    ]


def graph(title: str, queries: list[Query], unit: str = "short", *, width: int = 12, description: str = ""):
    """A time series of one or more PromQL queries."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .targets(_targets(queries))
        .unit(unit)
        .span(width)
        .height(8)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    return panel


def single(title: str, expr: str, unit: str = "short", *, width: int = 6, description: str = ""):
    """One figure (the last value), coloured by its thresholds when given."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .targets(_targets([(expr, title)]))
        .unit(unit)
        .span(width)
        .height(4)
        .color_mode(BigValueColorMode.VALUE)
    )


def traces(title: str, traceql: str, *, width: int = 24, description: str = ""):
    """A table of Tempo traces matching a TraceQL query (each row links to its trace)."""
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(TEMPO)
        .with_target(tempo.TempoQuery().ref_id("A").query_type("traceql").query(traceql).limit(20).datasource(TEMPO))
        .span(width)
        .height(8)
    )


def service_graph(width: int = 24):
    """Tempo's service graph (its metrics generator's service-graph series, queried through Tempo)."""
    return (
        nodegraph.Panel()
        .title("Service graph (Tempo)")
        .description(
            "Who calls whom, from parent/child spans: producers -> validator -> sinks. Needs Tempo's metrics generator."
        )
        .datasource(TEMPO)
        .with_target(tempo.TempoQuery().ref_id("A").query_type("serviceMap").datasource(TEMPO))
        .span(width)
        .height(10)
    )


def base(title: str, uid: str, description: str) -> dash.Dashboard:
    return (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .readonly()
        .link(
            dash.DashboardLink("Lambda pipeline")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .keep_time(True)
        )
    )


def query_variable(name: str, label: str, query: str) -> dash.QueryVariable:
    return (
        dash.QueryVariable(name)
        .label(label)
        .datasource(PROMETHEUS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


def pipeline_overview() -> dash.Dashboard:
    return (
        base(
            "Pipeline overview", "lp-overview", "Rate per stage, consumer lag, event-to-visible latency, dead letters."
        )
        .with_row(dash.Row("Now"))
        .with_panel(
            single(
                "Events in (per second)",
                'sum(rate(lp_stage_records_out_total{stage=~"ingest|generator|cdc"}[5m]))',
                "ops",
            )
        )
        .with_panel(
            single("Data quality (5 m)", QUALITY_5M, "percentunit", description="LowDataQuality fires below 0.95")
        )
        .with_panel(
            single(
                "Worst consumer lag", "max(lp_kafka_consumer_lag_seconds)", "s", description="HighIngestionLag: > 300 s"
            )
        )
        .with_panel(single("Dead letters (per second)", "sum(rate(lp_dead_letters_total[5m]))", "ops"))
        .with_row(dash.Row("Rate per stage"))
        .with_panel(
            graph(
                "Records in per stage",
                [(f"sum by (stage) (rate(lp_stage_records_in_total[{RATE}]))", "{{stage}}")],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Records out per stage",
                [(f"sum by (stage) (rate(lp_stage_records_out_total[{RATE}]))", "{{stage}}")],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Error ratio per stage",
                [
                    (
                        f"sum by (stage) (rate(lp_stage_errors_total[{RATE}]))"
                        f" / sum by (stage) (rate(lp_stage_records_in_total[{RATE}]))",
                        "{{stage}}",
                    )
                ],
                "percentunit",
                description="HighErrorRate fires above 5 %",
            )
        )
        .with_panel(
            graph(
                "Validator routes",
                [(f"sum by (route) (rate(lp_validator_routed_total[{RATE}]))", "{{route}}")],
                "ops",
            )
        )
        .with_row(dash.Row("Consumer lag"))
        .with_panel(
            graph(
                "Lag (seconds) per group and topic",
                [("max by (consumer_group, topic) (lp_kafka_consumer_lag_seconds)", "{{consumer_group}} {{topic}}")],
                "s",
                description="0 when caught up, else the age of the last record handled: an upper bound of the delay",
            )
        )
        .with_panel(
            graph(
                "Lag (records) per group and topic",
                [("sum by (consumer_group, topic) (lp_kafka_consumer_lag_records)", "{{consumer_group}} {{topic}}")],
            )
        )
        .with_row(dash.Row("End-to-end latency"))
        .with_panel(
            graph(
                "Event to visible per sink (p50, p99)",
                [
                    (
                        quantile(0.5, "lp_sink_event_to_visible_seconds", "sink"),
                        "p50 {{sink}}",
                    ),
                    (
                        quantile(0.99, "lp_sink_event_to_visible_seconds", "sink"),
                        "p99 {{sink}}",
                    ),
                ],
                "s",
                description="Record timestamp (ingest or generator) to the sink's durable write",
            )
        )
        .with_panel(
            graph(
                "Warehouse freshness",
                [("time() - max by (table) (lp_snowflake_loader_loaded_snapshot_timestamp_seconds)", "{{table}}")],
                "s",
                description="Age of the newest Iceberg snapshot the Snowflake loader has loaded",
            )
        )
        .with_row(dash.Row("Dead letters"))
        .with_panel(
            graph(
                "Dead letters by topic, code and rule",
                [(f"sum by (topic, code, rule) (rate(lp_dead_letters_total[{RATE}]))", "{{topic}} {{code}} {{rule}}")],
                "ops",
                width=24,
            )
        )
        .with_row(dash.Row("Traces"))
        .with_panel(service_graph())
        .with_panel(
            traces(
                "Dead-lettered traces",
                '{ name =~ "send .*[.]dlq" }',
                description="Sampled records that ended in a dead-letter span (lp.dlq.code, lp.dlq.rule on the span)",
            )
        )
    )


def service_detail() -> dash.Dashboard:
    stage = 'stage="$stage"'
    return (
        base("Service detail", "lp-service", "One stage's flow and each service's own metrics.")
        .with_variable(query_variable("stage", "Stage", "label_values(lp_stage_records_out_total, stage)"))
        .with_variable(query_variable("sink", "Sink", "label_values(lp_sink_rows_written_total, sink)"))
        .with_row(dash.Row("Stage $stage"))
        .with_panel(
            graph(
                "Records in, out and failed per instance",
                [
                    (f"sum by (instance) (rate(lp_stage_records_in_total{{{stage}}}[{RATE}]))", "in {{instance}}"),
                    (f"sum by (instance) (rate(lp_stage_records_out_total{{{stage}}}[{RATE}]))", "out {{instance}}"),
                    (f"sum by (instance) (rate(lp_stage_errors_total{{{stage}}}[{RATE}]))", "errors {{instance}}"),
                ],
                "ops",
                width=24,
            )
        )
        .with_row(dash.Row("Ingest"))
        .with_panel(
            graph(
                "Requests by code",
                [(f"sum by (code) (rate(lp_ingest_requests_total[{RATE}]))", "{{code}}")],
                "reqps",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Request duration p99",
                [(quantile(0.99, "lp_ingest_request_seconds"), "p99")],
                "s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Backlog to Kafka",
                [("sum(lp_ingest_backlog_events)", "events"), ("max(lp_ingest_oldest_pending_seconds)", "oldest (s)")],
                width=8,
            )
        )
        .with_row(dash.Row("Validator"))
        .with_panel(
            graph(
                "Batch duration p99",
                [
                    (
                        quantile(0.99, "lp_validator_runtime_batch_seconds"),
                        "p99",
                    )
                ],
                "s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Partitions and batches",
                [
                    ("sum(lp_validator_runtime_assigned_partitions)", "assigned"),
                    ("sum(lp_validator_runtime_held_partitions)", "held (retries)"),
                    ("sum(lp_validator_runtime_in_flight_batches)", "batches in flight"),
                ],
                width=8,
            )
        )
        .with_panel(
            graph(
                "Fallbacks and retries",
                [
                    (
                        f"sum by (topic) (rate(lp_validator_runtime_batch_fallbacks_total[{RATE}]))",
                        "fallback {{topic}}",
                    ),
                    (
                        f"sum by (dependency) (rate(lp_validator_runtime_batch_retries_total[{RATE}]))",
                        "retry {{dependency}}",
                    ),
                ],
                "ops",
                width=8,
            )
        )
        .with_row(dash.Row("Sink $sink"))
        .with_panel(
            graph(
                "Rows written and rejected",
                [
                    (f'sum by (topic) (rate(lp_sink_rows_written_total{{sink="$sink"}}[{RATE}]))', "written {{topic}}"),
                    (f'sum by (code) (rate(lp_sink_rows_rejected_total{{sink="$sink"}}[{RATE}]))', "rejected {{code}}"),
                ],
                "ops",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Write duration p99",
                [
                    (
                        quantile(0.99, "lp_sink_write_seconds", selector='{sink="$sink"}'),
                        "p99",
                    )
                ],
                "s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Buffer and backpressure",
                [
                    ('sum(lp_sink_buffered_records{sink="$sink"})', "buffered records"),
                    ('sum(lp_sink_paused_partitions{sink="$sink"})', "paused partitions"),
                    (f'sum(rate(lp_sink_backpressure_total{{sink="$sink"}}[{RATE}]))', "backpressure /s"),
                ],
                width=8,
            )
        )
        .with_panel(
            graph(
                "ClickHouse inserts",
                [
                    (f"sum by (table) (rate(lp_clickhouse_inserts_total[{RATE}]))", "ok {{table}}"),
                    (
                        f"sum by (table, kind) (rate(lp_clickhouse_insert_errors_total[{RATE}]))",
                        "error {{table}} {{kind}}",
                    ),
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "ClickHouse event to visible p99 (sampled rows)",
                [
                    (
                        quantile(0.99, "lp_clickhouse_event_to_visible_seconds", "table"),
                        "{{table}}",
                    )
                ],
                "s",
            )
        )
        .with_row(dash.Row("Producers: generator and CDC"))
        .with_panel(
            graph(
                "Events produced",
                [
                    (f"sum by (kind) (rate(lp_generator_events_total[{RATE}]))", "generator {{kind}}"),
                    (f"sum by (table, op) (rate(lp_cdc_events_total[{RATE}]))", "cdc {{table}} {{op}}"),
                ],
                "ops",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Produce latency p99",
                [
                    (
                        quantile(0.99, "lp_generator_produce_latency_seconds"),
                        "generator",
                    ),
                    (
                        quantile(0.99, "lp_ingest_produce_latency_seconds"),
                        "ingest",
                    ),
                    (
                        quantile(0.99, "lp_cdc_produce_latency_seconds"),
                        "cdc",
                    ),
                ],
                "s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "CDC slot lag and state",
                [
                    ("max(lp_cdc_slot_lag_bytes)", "slot lag (bytes)"),
                    ("min(lp_cdc_engine_running)", "engine running"),
                    ("min(lp_cdc_streaming)", "streaming"),
                ],
                width=8,
            )
        )
        .with_row(dash.Row("Operator"))
        .with_panel(
            graph(
                "Reconciliations and errors",
                [
                    (f"sum by (kind, reason) (rate(lp_operator_reconciles_total[{RATE}]))", "{{kind}} {{reason}}"),
                    (
                        f"sum by (kind, reason) (rate(lp_operator_reconcile_errors_total[{RATE}]))",
                        "error {{kind}} {{reason}}",
                    ),
                    (f"sum by (kind) (rate(lp_operator_drift_reverted_total[{RATE}]))", "drift reverted {{kind}}"),
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Reconcile duration p99",
                [
                    (
                        quantile(0.99, "lp_operator_reconcile_seconds", "kind"),
                        "{{kind}}",
                    )
                ],
                "s",
            )
        )
        .with_row(dash.Row("Traces"))
        .with_panel(
            traces(
                "Slow per-record hops (> 1 s)",
                '{ span.messaging.operation.type = "process" && duration > 1s }',
                description="A consumer's span covers its batch's work; it names the partition and offset",
            )
        )
    )


def data_quality() -> dash.Dashboard:
    return (
        base("Data quality", "lp-data-quality", "The validator's verdicts, rule failures and dead letters.")
        .with_panel(
            single(
                "Accepted share (5 m, all workers)",
                QUALITY_5M,
                "percentunit",
                width=8,
            )
        )
        .with_panel(
            single(
                "Worst worker's score (300 s)",
                "min(lp_validator_data_quality_ratio)",
                "percentunit",
                width=8,
                description="lp_validator_data_quality_ratio: NaN in a worker that decided nothing",
            )
        )
        .with_panel(
            single(
                "Rejected (per second)",
                'sum(rate(lp_validator_verdicts_total{verdict="rejected"}[5m]))',
                "ops",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Data-quality score",
                [
                    (
                        QUALITY_NOW,
                        "all workers",
                    ),
                    ("lp_validator_data_quality_ratio", "{{instance}} (300 s)"),
                ],
                "percentunit",
                description="LowDataQuality fires below 0.95",
            )
        )
        .with_panel(
            graph("Verdicts", [(f"sum by (verdict) (rate(lp_validator_verdicts_total[{RATE}]))", "{{verdict}}")], "ops")
        )
        .with_panel(
            graph(
                "Failure ratio per rule",
                [
                    (
                        f"sum by (rule) (rate(lp_validator_rule_failed_total[{RATE}]))"
                        f" / sum by (rule) (rate(lp_validator_rule_checked_total[{RATE}]))",
                        "{{rule}}",
                    )
                ],
                "percentunit",
            )
        )
        .with_panel(
            graph(
                "Dead letters by code and rule",
                [(f"sum by (code, rule) (rate(lp_dead_letters_total[{RATE}]))", "{{code}} {{rule}}")],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Refused before and after the validator",
                [
                    (
                        f'sum by (reason) (rate(lp_ingest_events_total{{status="rejected"}}[{RATE}]))',
                        "ingest {{reason}}",
                    ),
                    (f"sum by (sink, code) (rate(lp_sink_rows_rejected_total[{RATE}]))", "{{sink}} {{code}}"),
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Replays and reference data",
                [
                    (f"sum(rate(lp_validator_replays_dropped_total[{RATE}]))", "replays dropped"),
                    (
                        f"sum by (table, result) (rate(lp_validator_reference_changes_total[{RATE}]))",
                        "cdc {{table}} {{result}}",
                    ),
                ],
                "ops",
            )
        )
    )


def batch_and_warehouse() -> dash.Dashboard:
    return (
        base("Batch layer and warehouse", "lp-batch", "Archiver snapshots, Snowflake loads, nightly reconciliation.")
        .with_row(dash.Row("Archiver (Iceberg)"))
        .with_panel(
            graph(
                "Since the last snapshot",
                [("time() - max by (table) (lp_archiver_last_snapshot_timestamp_seconds)", "{{table}}")],
                "s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Rows committed and buffered",
                [
                    (f"sum by (table) (rate(lp_archiver_rows_committed_total[{RATE}]))", "committed/s {{table}}"),
                    ("sum by (table) (lp_archiver_buffered_rows)", "buffered {{table}}"),
                ],
                width=8,
            )
        )
        .with_panel(
            graph(
                "Commits",
                [
                    (
                        quantile(0.99, "lp_archiver_commit_seconds"),
                        "p99 (s)",
                    ),
                    (f"sum by (table) (increase(lp_archiver_snapshots_total[{RATE}]))", "snapshots {{table}}"),
                    (f"sum by (table) (increase(lp_archiver_commit_failures_total[{RATE}]))", "failures {{table}}"),
                    (f"sum by (table) (increase(lp_archiver_fenced_total[{RATE}]))", "fenced {{table}}"),
                ],
                width=8,
            )
        )
        .with_row(dash.Row("Snowflake loader"))
        .with_panel(
            graph(
                "Since the last successful load, and warehouse freshness",
                [
                    (
                        "time() - max by (table) (lp_snowflake_loader_last_success_timestamp_seconds)",
                        "last load {{table}}",
                    ),
                    (
                        "time() - max by (table) (lp_snowflake_loader_loaded_snapshot_timestamp_seconds)",
                        "data age {{table}}",
                    ),
                ],
                "s",
                width=8,
                description="LoaderNotLoading fires after 15 minutes without a load",
            )
        )
        .with_panel(
            graph(
                "Rows loaded and failures",
                [
                    (f"sum by (table) (rate(lp_snowflake_loader_rows_loaded_total[{RATE}]))", "rows/s {{table}}"),
                    (f"sum by (table) (increase(lp_snowflake_loader_failures_total[{RATE}]))", "failures {{table}}"),
                ],
                width=8,
            )
        )
        .with_panel(
            graph(
                "Step duration p99",
                [
                    (
                        quantile(0.99, "lp_snowflake_loader_step_seconds", "step"),
                        "{{step}}",
                    )
                ],
                "s",
                width=8,
            )
        )
        .with_row(dash.Row("Reconciliation (nightly)"))
        .with_panel(single("Consistency", "min(lp_reconcile_consistency_ratio)", "percentunit"))
        .with_panel(single("Minimum consistency", "min(lp_reconcile_min_consistency_ratio)", "percentunit"))
        .with_panel(single("Last run could read every store", "min(lp_reconcile_success)"))
        .with_panel(single("Since the last run", "time() - max(lp_reconcile_last_run_timestamp_seconds)", "s"))
        .with_panel(
            graph(
                "Consistency by measure",
                [
                    ("min(lp_reconcile_events_consistency_ratio)", "events"),
                    ("min(lp_reconcile_rows_consistency_ratio)", "rows"),
                    ("min(lp_reconcile_revenue_consistency_ratio)", "revenue"),
                    ("min(lp_reconcile_min_consistency_ratio)", "minimum"),
                ],
                "percentunit",
            )
        )
        .with_panel(
            graph(
                "Where the stores differ",
                [
                    ("sum by (store, status) (lp_reconcile_differing_cells)", "cells {{store}} {{status}}"),
                    ("sum by (store) (lp_reconcile_missing_events)", "missing events {{store}}"),
                    ("sum by (store) (lp_reconcile_duplicate_rows)", "duplicate rows {{store}}"),
                ],
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], dash.Dashboard]] = {
    "pipeline-overview.json": pipeline_overview,
    "service-detail.json": service_detail,
    "data-quality.json": data_quality,
    "batch-and-warehouse.json": batch_and_warehouse,
}


def render() -> dict[str, str]:
    """File name -> the dashboard's JSON, as checked in."""
    return {
        name: json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUTPUT_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
