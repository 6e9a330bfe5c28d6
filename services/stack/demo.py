"""`make run`: the whole platform on one machine, end to end, then a summary.

Starts the embedded stack (or reuses one `make up` left running), applies the topic and schema declarations
from deploy/k8s, starts every service as its own process, drives a bounded workload, shows progress, checks
the result and writes `.local/run-summary.json`. Everything it started is stopped on the way out, also on
Ctrl-C or when a part fails; the message then names the part and its log file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Message

from services.archiver import runsummary as archive
from services.contracts.envelope import TOMBSTONE_OP
from services.contracts.headers import DLQ_ERROR_CODE, DLQ_RULE, INJECTED_FAULT, PRODUCER
from services.contracts.topics import (
    CDC_PRODUCTS,
    CDC_TRANSACTIONS,
    CDC_USERS,
    EVENTS_PROCESSED,
    EVENTS_RAW,
    EVENTS_RAW_RETRY,
    TRANSACTIONS_PROCESSED,
    TRANSACTIONS_STATUS_HISTORY,
    cdc_topic,
    dead_letter_topic,
    is_dead_letter_topic,
)
from services.declarations.apply import apply_declarations
from services.declarations.resources import load_declarations
from services.generator.bad_events import BAD_KINDS
from services.generator.model import Simulation
from services.generator.oltp import OltpWriter
from services.ingest.client import IngestClient
from services.kit.avro import AvroDeserializer, Decoded, SchemaRepository
from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.kit.kafka import committed_offsets, scan_topic
from services.kit.paths import repo_root
from services.reconcile import runsummary as reconciliation
from services.snowflake_loader import runsummary as warehouse
from services.stack.components import ComponentError
from services.stack.processes import ServiceProcess
from services.stack.settings import StackSettings, pick_free_ports
from services.stack.stack import LocalStack, StackError
from services.stack.traces import DEMO_SAMPLE_RATIO, traces_file


class PartFailed(RuntimeError):
    def __init__(self, part: str, log_path: Path, detail: str) -> None:
        super().__init__(f"{part} failed: {detail}\n  log: {log_path}")
        self.part, self.log_path = part, log_path


@dataclass(frozen=True)
class Chaos:
    """`kill -9` of running services during the run, each restarted 1-3 s later: the exactly-once test.

    Without `catch_up`, each of `services` is killed `kills` times while the load is produced (in turns, each
    restarted and ready before the next kill). With `catch_up`, the validator starts only once the whole load
    is in events.raw and is killed `kills` times while it catches up at full speed, a moment after each
    restart has recovered its partitions (the moment its last commit lags furthest behind)."""

    services: tuple[str, ...] = ("validator", "clickhouse-sink", "archiver")
    kills: int = 5
    catch_up: bool = False
    seed: int = 1


class ChaosMonkey(threading.Thread):
    def __init__(self, run: DemoRun, chaos: Chaos, targets: list[ServiceProcess]) -> None:
        super().__init__(name="chaos", daemon=True)
        self.run_, self.chaos, self.targets = run, chaos, targets
        self.down: set[str] = set()  # killed, not yet restarted: their exit is not a failure
        self.kills: dict[str, int] = {}
        self.error: BaseException | None = None
        self._rng = random.Random(chaos.seed)
        self._halted = threading.Event()  # the run ended (or failed): no more kills, no more restarts
        self._log_marks: dict[str, int] = {}  # log size at the last restart

    def _recovered_since(self, service: ServiceProcess) -> bool:
        """Whether the validator's runtime logged its recovery since its last (re)start."""
        with service.log_path.open("rb") as log:
            log.seek(self._log_marks.get(service.name, 0))
            return b"recovered" in log.read()

    def run(self) -> None:
        try:
            for _ in range(self.chaos.kills):
                for service in self.targets:
                    self._kill_and_restart(service)
        except BaseException as error:  # reported by the run's thread
            self.error = error

    def halt(self) -> None:
        """Stop killing and restarting, and wait for the thread: a run that failed stops its services after
        this, so no restart can outlive the run (a restarted sink would keep the store's lock)."""
        self._halted.set()
        self.join(timeout=200)

    def _kill_and_restart(self, service: ServiceProcess) -> None:
        if self.chaos.catch_up:  # a moment into the catch-up after its partitions were recovered
            deadline = time.monotonic() + 180
            while not self._recovered_since(service) and time.monotonic() < deadline:
                if self._halted.wait(0.1):
                    return
            self._halted.wait(self._rng.uniform(0.3, 1.0))
        else:
            self._halted.wait(self._rng.uniform(1.0, 3.0))
        if self._halted.is_set():
            return
        self.down.add(service.name)
        service.kill()
        self.kills[service.name] = self.kills.get(service.name, 0) + 1
        self.run_.out(f"chaos: kill -9 {service.name} ({self.kills[service.name]})")
        if self._halted.wait(self._rng.uniform(1.0, 3.0)):
            return
        self._log_marks[service.name] = _size(service.log_path)
        service.start(self.run_.stack.env(), append_log=True)
        self.down.discard(service.name)
        if not service.wait_ready(180):
            raise PartFailed(service.name, service.log_path, f"not ready after a restart\n{service.log_tail()}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class DemoRun:
    stack: LocalStack
    events: int
    rate: float
    seed: int
    bad_share: float
    out: Callable[[str], None] = print
    services: list[ServiceProcess] = field(default_factory=list)
    chaos: Chaos | None = None
    monkey: ChaosMonkey | None = None

    @property
    def state_dir(self) -> Path:
        return self.stack.state_dir

    def kafka(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.stack.bootstrap_servers}

    # --- phases ---------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        started = datetime.now(UTC)
        t0 = time.monotonic()
        root = repo_root()
        self.out("applying topic and schema declarations from deploy/k8s ...")
        report = apply_declarations(root / "deploy" / "k8s", self.stack.bootstrap_servers)
        self.out(str(report))
        if not report.ok:
            raise PartFailed("declarations", self.stack.log_dir, "some topics or schemas could not be applied")
        topics = [t.topic_name for t in load_declarations(root / "deploy" / "k8s").topics]
        before = {topic: scan_topic(self.kafka(), topic) for topic in topics}
        with OltpWriter.connect(self.stack.postgres_dsn) as oltp:
            oltp.apply_schema()  # CDC's preflight wants the tables it captures
        reports = self.state_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        for stale in reports.glob("*.json"):
            stale.unlink()
        generator_port, ingest_http_port, ingest_grpc_port, cdc_port, validator_port = pick_free_ports(5)
        clickhouse_port, clickhouse_query_port, archiver_port = pick_free_ports(3)
        self.ingest_target = f"127.0.0.1:{ingest_grpc_port}"
        # Every service writes its spans to one JSON-lines file (`python -m services.stack trace` reads it), fresh
        # each run. One event in a hundred is traced unless OTEL_SAMPLE_RATIO says otherwise.
        spans_file = traces_file(self.state_dir)
        spans_file.unlink(missing_ok=True)
        traces = {
            "OTEL_TRACES_FILE": str(spans_file),
            "OTEL_SAMPLE_RATIO": os.environ.get("OTEL_SAMPLE_RATIO", DEMO_SAMPLE_RATIO),
        }
        cdc = ServiceProcess(
            "cdc",
            "services.cdc",
            self.stack.log_dir,
            env={
                "CDC_OFFSETS_FILE": str(self.state_dir / "cdc" / "offsets.dat"),
                "CDC_HEARTBEAT_INTERVAL_MS": "1000",
                "REPORT_FILE": str(reports / "cdc.json"),
                **traces,
            },
            http_port=cdc_port,
        )
        generator = ServiceProcess(
            "generator",
            "services.generator",
            self.stack.log_dir,
            env={
                "EVENTS": str(self.events),
                "RATE": str(self.rate),
                "SEED": str(self.seed),
                "BAD_EVENT_SHARE": str(self.bad_share),
                "REPORT_FILE": str(reports / "generator.json"),
                **traces,
            },
            http_port=generator_port,
            bounded=True,
        )
        ingest = ServiceProcess(
            "ingest",
            "services.ingest",
            self.stack.log_dir,
            env={"GRPC_PORT": str(ingest_grpc_port), "GRPC_BIND_HOST": "127.0.0.1", **traces},
            http_port=ingest_http_port,
        )
        validator = ServiceProcess(
            "validator",
            "services.validator",
            self.stack.log_dir,
            env={
                "CONSUMER_GROUP": VALIDATOR_GROUP,
                # Late references (a user's CDC row behind its first event) retry after 0.5, 1, 2, 4, 8 s:
                # the demo drains in seconds, production keeps the 2 s default.
                "VALIDATOR_RETRY_BASE_DELAY_S": "0.5",
                **traces,
            },
            http_port=validator_port,
        )
        clickhouse = ServiceProcess(
            "clickhouse-sink",
            "services.clickhouse_sink",
            self.stack.log_dir,
            env={
                "CONSUMER_GROUP": CLICKHOUSE_GROUP,
                "CLICKHOUSE_CHDB_PATH": str(self.state_dir / "clickhouse"),
                "CLICKHOUSE_SINK_QUERY_PORT": str(clickhouse_query_port),
                "CLICKHOUSE_SINK_REPORT_FILE": str(reports / "clickhouse-sink.json"),
                **traces,
            },
            http_port=clickhouse_port,
        )
        archiver_env = archive.local_env(self.state_dir)
        archiver = ServiceProcess(
            "archiver", "services.archiver", self.stack.log_dir, env={**archiver_env, **traces}, http_port=archiver_port
        )
        archive_before = archive.table_stats({**self.stack.env(), **archiver_env})
        services = (cdc, generator, ingest, validator, clickhouse, archiver)
        if self.stack.prometheus_running:  # scraped from their start (file discovery picks the list up live)
            self.stack.prometheus.register_targets({service.name: service.http_port for service in services})
        self._start(cdc)
        self._wait_for_metric(cdc, "lp_cdc_streaming", 1.0, timeout=180)  # JVM start + snapshot
        catch_up = self.chaos is not None and self.chaos.catch_up
        if not catch_up:
            self._start(validator)
            self._wait_ready(validator, timeout=180)  # reads users/products to their end first
        self._start(clickhouse)
        self._start(archiver)
        self._wait_ready(clickhouse, timeout=120)  # migrations applied
        self._wait_ready(archiver, timeout=120)  # tables created or evolved to the contracts
        tables_before = postgres_table_stats(self.stack.postgres_dsn)
        self._register_shop(cdc)
        self._start(generator)
        self._start(ingest)
        if self.chaos is not None and not catch_up:
            self._unleash(self.chaos)
        self._watch(time.monotonic())
        if catch_up:
            assert self.chaos is not None
            self._start(validator)  # the whole load is in events.raw: it catches up at full speed
            self._unleash(self.chaos)
        self._tame()
        api = self._publish_through_api()
        self._wait_for_cdc(cdc)
        self._wait_until_consumed(validator, VALIDATOR_GROUP, VALIDATOR_INPUTS, before)
        self._wait_until_consumed(clickhouse, CLICKHOUSE_GROUP, CLICKHOUSE_INPUTS, before)
        # Last: it archives every dead-letter topic, the sinks' too. Its Kafka commits run ahead of its tables
        # (the offsets that count are in the snapshots); SIGTERM below commits what it buffered.
        self._wait_until_consumed(archiver, archive.GROUP, archive.INPUTS, before)
        # Before the services stop: each long-running one must have been scraped while it ran.
        prometheus = self._prometheus_report(t0, [s.name for s in services if not s.bounded])
        for service in self.services:
            if service.bounded:
                continue
            code = service.stop()
            if code not in (0, None):
                raise PartFailed(service.name, service.log_path, f"exited with {code} on SIGTERM")
        changes = {
            table: {op: after[i] - tables_before.get(table, (0, 0, 0))[i] for i, op in enumerate("cud")}
            for table, after in postgres_table_stats(self.stack.postgres_dsn).items()
        }
        archive_after = archive.table_stats({**self.stack.env(), **archiver_env})
        # The warehouse and the check of the three stores run once everything upstream has stopped: the loader
        # loads every new snapshot, then the reconciliation reads ClickHouse's folder, the lake and Snowflake.
        loader_env = {**self.stack.env(), **archiver_env, **warehouse.local_env(self.state_dir)}
        load = self._load_warehouse({**loader_env, **traces})
        warehouse_stats = warehouse.warehouse_stats(loader_env)
        self.out("reconciling ClickHouse, Iceberg and Snowflake ...")
        reconciled = reconciliation.run(
            {**loader_env, **reconciliation.local_env(self.state_dir, clickhouse_query_port)},
            metrics_file=reports / "reconcile.prom",
        )
        summary = self._summarise(
            started,
            t0,
            before,
            json.loads((reports / "generator.json").read_text()),
            api,
            json.loads((reports / "cdc.json").read_text()),
            changes,
            json.loads((reports / "clickhouse-sink.json").read_text()),
            (archive_before, archive_after),
            (load, warehouse_stats),
            reconciled,
        )
        summary["prometheus"] = prometheus
        if "targets_ever_up" in prometheus:
            summary["checks"]["prometheus: every service's /metrics scraped successfully while it ran"] = all(
                prometheus["targets_ever_up"].get(name) for name in prometheus["long_running"]
            )
            summary["ok"] = all(summary["checks"].values())
        return summary

    def _prometheus_report(self, t0: float, long_running: list[str]) -> dict[str, Any]:
        """Scrape results and the alerts seen this run (report only: most rules' `for:` outlast a demo)."""
        if not self.stack.prometheus_running:
            return {"skipped": self.stack.skipped.get("prometheus", "not part of this stack")}
        try:
            report = self.stack.prometheus.run_report(time.monotonic() - t0, long_running)
        except (OSError, RuntimeError, KeyError, ValueError) as error:  # Prometheus died or answered nonsense
            self.out(f"prometheus: cannot query it ({error!r}); log: {self.stack.prometheus.log_path}")
            report = {"url": self.stack.prometheus.url, "targets_ever_up": {}, "alerts": {}, "error": repr(error)}
        return {**report, "long_running": long_running}

    def _unleash(self, chaos: Chaos) -> None:
        names = ("validator",) if chaos.catch_up else chaos.services
        targets = [service for service in self.services if service.name in names]
        self.monkey = ChaosMonkey(self, chaos, targets)
        self.monkey.start()

    def halt_chaos(self) -> None:
        """End the chaos now (a failed or interrupted run), before its services are stopped."""
        if self.monkey is not None:
            self.monkey.halt()

    def _tame(self) -> None:
        """Wait for the chaos to end: every kill done, every killed service restarted and ready."""
        if self.monkey is None:
            return
        self.monkey.join()
        if self.monkey.error is not None:
            raise self.monkey.error
        self.out(f"chaos done: kill -9 {self.monkey.kills}")

    def _load_warehouse(self, env: dict[str, str]) -> dict[str, Any]:
        """`python -m services.snowflake_loader run-once`: the command a CronJob or the service's loop runs."""
        self.out("loading new Iceberg snapshots into Snowflake ...")
        log_path = self.stack.log_dir / "snowflake-loader.log"
        with log_path.open("ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "services.snowflake_loader", "run-once"],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=900,
                check=False,
            )
        if done.returncode != 0:
            raise PartFailed("snowflake-loader", log_path, f"run-once exited with {done.returncode}")
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return result

    def _start(self, service: ServiceProcess) -> None:
        self.services.append(service)
        service.start(self.stack.env())
        self.out(f"started {service.name} (pid {service.popen.pid}, log {service.log_path})")

    def _register_shop(self, cdc: ServiceProcess) -> None:
        """Write the shop's users and products (the generator's population: same seed, same defaults) and wait
        until CDC has them in Kafka, as users register before they browse. The generator writes them again
        at its start, a no-op then. Without this, the first events race CDC for their users: the validator
        would retry them (correct, but a loaded machine can outlast the demo's short retry budget)."""
        shop = Simulation(self.seed)
        with OltpWriter.connect(self.stack.postgres_dsn) as oltp:
            oltp.upsert_users(shop.users)
            oltp.upsert_products(shop.products)
        self._wait_for_cdc(cdc)

    def _wait_ready(self, service: ServiceProcess, timeout: float) -> None:
        self.out(f"waiting for {service.name} to be ready ...")
        if not service.wait_ready(timeout):
            code = service.exit_code()
            detail = f"exited with {code}\n{service.log_tail()}" if code is not None else f"not ready in {timeout:.0f}s"
            raise PartFailed(service.name, service.log_path, detail)

    def _wait_until_consumed(
        self,
        service: ServiceProcess,
        group: str,
        topics: tuple[str, ...],
        since: dict[str, dict[int, int]],
        timeout: float = 300,
        quiet_s: float = 2.0,
    ) -> None:
        """Until `group` has committed every record of `topics` and they stopped growing for `quiet_s`.

        Quiet matters for the validator: a record waiting for a retry is produced to events.raw.retry again
        until it is due, so the retry topic only stops growing once every retry has been decided."""
        self.out(f"waiting for {service.name} to consume {', '.join(topics)} ...")
        ends = {topic: dict(since.get(topic, {})) for topic in topics}
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while True:
            grown = False
            for topic in topics:
                latest = scan_topic(self.kafka(), topic, start=ends[topic])
                grown = grown or latest != ends[topic]
                ends[topic] = latest
            committed = committed_offsets(
                self.kafka(), group, [(topic, p) for topic, parts in ends.items() for p in parts]
            )
            behind = sum(max(0, end - committed[(t, p)]) for t, parts in ends.items() for p, end in parts.items())
            now = time.monotonic()
            if behind or grown:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return
            code = service.exit_code()
            if code is not None:
                raise PartFailed(service.name, service.log_path, f"exited with {code}\n{service.log_tail()}")
            if now > deadline:
                raise PartFailed(service.name, service.log_path, f"{behind} records not consumed after {timeout:.0f}s")
            time.sleep(0.5)

    def _wait_for_metric(self, service: ServiceProcess, metric: str, value: float, timeout: float) -> None:
        self.out(f"waiting for {service.name} ({metric} = {value:g}) ...")
        deadline = time.monotonic() + timeout
        while service.metrics().get(metric) != value:
            code = service.exit_code()
            if code is not None:
                raise PartFailed(service.name, service.log_path, f"exited with {code}\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise PartFailed(service.name, service.log_path, f"{metric} not {value:g} after {timeout:.0f}s")
            time.sleep(0.5)

    def _wait_for_cdc(self, cdc: ServiceProcess, timeout: float = 120) -> None:
        """Until the replication slot confirms everything written so far: then every change is in Kafka.

        The slot only confirms a position after Debezium committed it, which happens after our flush to Kafka.
        """
        with psycopg.connect(self.stack.postgres_dsn, autocommit=True) as connection:
            (target,) = connection.execute("SELECT pg_current_wal_lsn()").fetchone()
            self.out(f"waiting for CDC to confirm WAL position {target} ...")
            deadline = time.monotonic() + timeout
            while True:
                row = connection.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (target, CDC_SLOT),
                ).fetchone()
                if row and row[0]:
                    return
                if cdc.exit_code() is not None:
                    raise PartFailed(cdc.name, cdc.log_path, f"exited with {cdc.exit_code()}\n{cdc.log_tail()}")
                if time.monotonic() > deadline:
                    raise PartFailed(cdc.name, cdc.log_path, f"slot {CDC_SLOT} did not reach {target} in {timeout}s")
                time.sleep(0.5)

    def _publish_through_api(self) -> dict[str, Any]:
        """What an external producer does: batches through the gRPC ingest API, a few of them malformed."""
        count = max(100, self.events // 20)
        simulation = Simulation(self.seed + 1, n_users=200, n_products=100)
        # The shop's users and products (the generator's population, same seed, in PostgreSQL): an external
        # producer refers to real ones, or the validator would rightly dead-letter its events as unknown.
        shop = Simulation(self.seed)
        records = []
        for index in range(count):
            record = simulation.next_event(datetime.now(UTC)).to_record()
            record["user_id"] = shop.users[index % len(shop.users)].user_id
            if record["product_id"] is not None:
                record["product_id"] = shop.products[index % len(shop.products)].product_id
            if index % 50 == 7:
                record["event_id"] = None  # refused at the door: MISSING_FIELD
            records.append(record)
        accepted, rejected = 0, Counter[str]()
        self.out(f"publishing {count} events through the ingest API at {self.ingest_target} ...")
        with IngestClient(self.ingest_target) as client:
            client.wait_until_serving(timeout_s=30)
            for start in range(0, count, 500):
                for result in client.publish(records[start : start + 500]):
                    if result.accepted:
                        accepted += 1
                    else:
                        rejected[result.reason_code or "?"] += 1
        return {"sent": count, "accepted": accepted, "rejected": dict(rejected)}

    def _watch(self, since: float) -> None:
        """Progress until every bounded service has finished; fail fast if any part dies."""
        generator = next(service for service in self.services if service.name == "generator")
        validator = next((service for service in self.services if service.name == "validator"), None)
        interactive = sys.stdout.isatty()
        last_line = 0.0
        while True:
            try:
                self.stack.check()
            except ComponentError as error:
                raise PartFailed(error.component, error.log_path or self.stack.log_dir, str(error)) from None
            pending = False
            down = self.monkey.down if self.monkey is not None else set()
            for service in self.services:
                code = service.exit_code()
                if code is None:
                    pending = pending or service.bounded
                elif service.name in down or (code == -signal.SIGKILL and self.monkey is not None):
                    continue  # killed on purpose; the monkey restarts it
                elif code != 0 or not service.bounded:
                    raise PartFailed(service.name, service.log_path, f"exited with {code}\n{service.log_tail()}")
            metrics = generator.metrics()
            produced = int(sum(v for k, v in metrics.items() if k == "lp_generator_events_total"))
            elapsed = time.monotonic() - since
            line = (
                f"[{elapsed:6.1f}s] events.raw {produced:>8}/{self.events} "
                f"({produced / elapsed if elapsed else 0:,.0f}/s)  "
                f"postgres {int(metrics.get('lp_generator_oltp_rows_total', 0)):>7} rows written"
            )
            if validator is not None:
                line += f"  validated {int(validator.metrics().get('lp_validator_routed_total', 0)):>8}"
            if interactive:
                print("\r" + line, end="", flush=True)
            elif time.monotonic() - last_line >= 5:
                self.out(line)
                last_line = time.monotonic()
            if not pending:
                if interactive:
                    print()
                return
            time.sleep(0.5)

    # --- summary --------------------------------------------------------------------------------------
    def _summarise(
        self,
        started: datetime,
        t0: float,
        before: dict[str, dict[int, int]],
        generator: dict[str, Any],
        ingest: dict[str, Any],
        cdc: dict[str, Any],
        postgres_changes: dict[str, dict[str, int]],
        clickhouse: dict[str, Any],
        archive_stats: tuple[dict[str, Any], dict[str, Any]],
        warehouse_load: tuple[dict[str, Any], dict[str, Any]],
        reconciled: dict[str, Any],
    ) -> dict[str, Any]:
        decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
        purchases: set[str] = set()

        def collect_purchase(message: Message) -> None:
            headers = dict(message.headers() or ())
            if INJECTED_FAULT in headers or headers.get(PRODUCER) != b"generator":
                return
            result = decode(message.value())
            if isinstance(result, Decoded) and result.record["event_type"] == "purchase":
                purchases.add(result.record["transaction_id"])

        validation = ValidationTally(SchemaRepository.load())
        collectors: dict[str, Callable[[Message], None]] = {EVENTS_RAW: collect_purchase}
        collectors[EVENTS_PROCESSED] = validation.processed
        for topic in before:
            if is_dead_letter_topic(topic):
                collectors[topic] = validation.dead_letter
        topics: dict[str, int] = {}
        for topic, start in before.items():
            counter = _Counter(collectors.get(topic))
            scan_topic(self.kafka(), topic, start=start, on_message=counter)
            topics[topic] = counter.count
        with psycopg.connect(self.stack.postgres_dsn, autocommit=True) as connection:
            stores = {
                f"postgres.{table}": connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("users", "products", "transactions")
            }
            found = connection.execute(
                "SELECT count(*) FROM transactions WHERE transaction_id = ANY(%s::uuid[])", (list(purchases),)
            ).fetchone()[0]
        checks = {
            "events.raw has every produced and every accepted event": topics.get(EVENTS_RAW)
            == generator["events_produced"] + ingest["accepted"],
            "ingest API accepted every well-formed event": ingest["accepted"] + sum(ingest["rejected"].values())
            == ingest["sent"]
            and set(ingest["rejected"]) <= {"MISSING_FIELD"},
            "generator produced the requested events": generator["events_produced"] == self.events,
            "every purchase event has its PostgreSQL transaction": found == len(purchases),
        }
        injected = sum(generator["events_by_kind"].get(kind, 0) for kind in BAD_KINDS)
        cdc_transactions = sum(
            n for op, n in cdc["events_by_table"].get("transactions", {}).items() if op != TOMBSTONE_OP
        )
        checks |= {
            "validator: every event of events.raw processed or dead-lettered, once": topics.get(EVENTS_PROCESSED, 0)
            + topics.get(dead_letter_topic(EVENTS_RAW), 0)
            + topics.get(dead_letter_topic(EVENTS_RAW_RETRY), 0)
            == topics.get(EVENTS_RAW),
            "validator: every injected bad event dead-lettered": validation.injected_dead == injected,
            "validator: no good event dead-lettered": validation.good_dead == 0,
            "validator: every CDC transaction change processed or dead-lettered": topics.get(TRANSACTIONS_PROCESSED, 0)
            + topics.get(dead_letter_topic(CDC_TRANSACTIONS), 0)
            == cdc_transactions,
        }
        ch_tables = clickhouse.get("tables") or {}
        stores |= {f"clickhouse.{name}": rows for name, rows in ch_tables.items() if ":" not in name}
        if self.monkey is None:  # the sink's report counts its last process only: a chaos run compares tables
            checks["clickhouse: every processed event stored or dead-lettered"] = clickhouse["rows_written"].get(
                EVENTS_PROCESSED, 0
            ) + clickhouse["rows_rejected"].get(EVENTS_PROCESSED, 0) == topics.get(EVENTS_PROCESSED, 0)
        checks |= {
            "clickhouse: no event_id twice": ch_tables.get("user_events_realtime: duplicate rows") == 0,
            # every materialized view's totals (the KPI windows are plain views over FINAL)
            "clickhouse: views agree with the table": ch_tables.get("user_activity_summary: events")
            == ch_tables.get("user_events_realtime")
            and ch_tables.get("conversion_funnel: events") == ch_tables.get("user_events_realtime: funnel events"),
        }
        archived, archive_checks = archive.summarise(*archive_stats, topics)
        checks |= archive_checks
        stores |= {f"iceberg.{table}": figures["rows_in_table"] for table, figures in archived.items()}
        load, warehouse_stats = warehouse_load
        warehouse_rows, warehouse_checks = warehouse.summarise(warehouse_stats)
        checks |= warehouse_checks
        checks |= reconciliation.checks(reconciled)
        for table, changed in postgres_changes.items():
            captured = cdc["events_by_table"].get(table, {})
            checks[f"CDC captured every change of {table} (c/u/d {changed})"] = all(
                captured.get(op, 0) == changed[op] for op in "cud"
            )
            tombstones = captured.get(TOMBSTONE_OP, 0)
            checks[f"cdc.postgres.{table} holds every captured event"] = (
                topics.get(cdc_topic(table)) == sum(n for op, n in captured.items() if op != TOMBSTONE_OP) + tombstones
            )
        return {
            "started_at": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - t0, 2),
            "params": {"events": self.events, "rate": self.rate, "seed": self.seed, "bad_share": self.bad_share},
            "chaos": {"kills": self.monkey.kills if self.monkey is not None else {}},
            "events_produced": generator["events_produced"],
            "events_by_kind": generator["events_by_kind"],
            "ingest_api": ingest,
            "cdc": {"events_by_table": cdc["events_by_table"], "events": cdc["events"]},
            "topics": topics,
            "stores": stores,
            "latency_ms": {
                "generator->events.raw (produce to ack)": generator["produce_latency_ms"],
                "cdc->cdc.postgres.* (produce to ack)": cdc["produce_latency_ms"],
                "events.processed -> visible in ClickHouse (event time)": clickhouse["event_to_visible_ms"].get(
                    "user_events_realtime"
                ),
                "transactions.processed -> visible in ClickHouse (change time)": clickhouse["event_to_visible_ms"].get(
                    "transactions_realtime"
                ),
            },
            "purchases": {"events": len(purchases), "postgres_rows_found": found},
            "validator": validation.summary(topics),
            "clickhouse": {k: v for k, v in clickhouse.items() if k != "tables"},
            "archive": archived,
            "snowflake": {"load": load.get("tables", {}), "rows": warehouse_rows},
            "reconcile": reconciled,
            "checks": checks,
            "ok": all(checks.values()),
            "logs": str(self.stack.log_dir),
        }


CDC_SLOT = "lp_cdc"  # CdcSettings.cdc_slot_name's default
CLICKHOUSE_GROUP = "lp-clickhouse-sink"
CLICKHOUSE_INPUTS = (EVENTS_PROCESSED, TRANSACTIONS_PROCESSED)
VALIDATOR_GROUP = "lp-validator"
VALIDATOR_INPUTS = (EVENTS_RAW, EVENTS_RAW_RETRY, CDC_USERS, CDC_PRODUCTS, CDC_TRANSACTIONS)
CAPTURED_TABLES = ("users", "products", "transactions")


def postgres_table_stats(dsn: str) -> dict[str, tuple[int, int, int]]:
    """Rows inserted, updated, deleted per captured table since the statistics were reset (server counters)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
            "WHERE schemaname = 'public' AND relname = ANY(%s)",
            (list(CAPTURED_TABLES),),
        ).fetchall()
    return {name: (ins, upd, dele) for name, ins, upd, dele in rows}


class ValidationTally:
    """What the validator made of this run, read back from its output topics (not from its own report)."""

    def __init__(self, schemas: SchemaRepository) -> None:
        self.decode_processed = AvroDeserializer(schemas, "processed_event")
        self.flagged: Counter[str] = Counter()  # warn rules, from quality_flags of processed events
        self.dead: Counter[str] = Counter()  # "topic: CODE (rule)"
        self.injected_dead = 0  # dead letters of events the generator broke on purpose
        self.good_dead = 0  # dead letters of events the generator meant to be good

    def processed(self, message: Message) -> None:
        result = self.decode_processed(message.value())
        if isinstance(result, Decoded):
            self.flagged.update(result.record["quality_flags"])

    def dead_letter(self, message: Message) -> None:
        headers = dict(message.headers() or ())
        code = (headers.get(DLQ_ERROR_CODE) or b"?").decode()
        rule = (headers.get(DLQ_RULE) or b"").decode()
        self.dead[f"{message.topic()}: {code}" + (f" ({rule})" if rule else "")] += 1
        if INJECTED_FAULT in headers:
            self.injected_dead += 1
        elif headers.get(PRODUCER) == b"generator":
            self.good_dead += 1

    def summary(self, topics: dict[str, int]) -> dict[str, Any]:
        return {
            "processed": {t: topics.get(t, 0) for t in (EVENTS_PROCESSED, TRANSACTIONS_PROCESSED)},
            "status_changes": topics.get(TRANSACTIONS_STATUS_HISTORY, 0),
            "retries_produced": topics.get(EVENTS_RAW_RETRY, 0),
            "dead_lettered": dict(sorted(self.dead.items())),
            "dead_lettered_injected_faults": self.injected_dead,
            "dead_lettered_good_generator_events": self.good_dead,
            "flagged_by_warn_rules": dict(sorted(self.flagged.items())),
        }


class _Counter:
    def __init__(self, then: Callable[[Message], None] | None) -> None:
        self.count = 0
        self.then = then

    def __call__(self, message: Message) -> None:
        self.count += 1
        if self.then is not None:
            self.then(message)


def print_summary(summary: dict[str, Any], path: Path) -> None:
    print(f"\nrun summary ({path}):")
    print(f"  events produced   {summary['events_produced']}  {summary['events_by_kind']}")
    for table, ops in summary["cdc"]["events_by_table"].items():
        print(f"  CDC {table:<13} {ops}")
    api = summary["ingest_api"]
    print(f"  ingest API        {api['accepted']} accepted, rejected {api['rejected'] or 'none'}")
    for topic, count in summary["topics"].items():
        print(f"  topic {topic:<24} {count} messages this run")
    for store, rows in summary["stores"].items():
        print(f"  store {store:<24} {rows} rows")
    for line in archive.summary_lines(summary["archive"]):
        print(line)
    for line in warehouse.summary_lines(summary["snowflake"]["rows"]):
        print(line)
    for line in reconciliation.summary_lines(summary["reconcile"]):
        print(line)
    validator = summary["validator"]
    print(f"  validator         processed {validator['processed']}, status changes {validator['status_changes']}")
    for reason, count in validator["dead_lettered"].items():
        print(f"    dead-lettered   {count:>7}  {reason}")
    for rule, count in validator["flagged_by_warn_rules"].items():
        print(f"    flagged (warn)  {count:>7}  {rule}")
    for stage, figures in summary["latency_ms"].items():
        print(f"  latency {stage}: {figures}")
    prometheus = summary.get("prometheus", {})
    if "skipped" in prometheus:
        print(f"  prometheus        {prometheus['skipped']}")
    elif prometheus:
        up = prometheus["targets_ever_up"]
        print(f"  prometheus        {prometheus['url']}: targets up at least once {sum(up.values())}/{len(up)}", end="")
        never = [name for name, seen in up.items() if not seen]
        print(f" (never up: {', '.join(never)})" if never else "")
        alerts = prometheus["alerts"]
        if not alerts:
            print("    alerts          none pending or firing during the run")
        for alert, state in alerts.items():
            print(f"    alert           {state:<8} {alert}")
    for check, ok in summary["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {check}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.stack.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000, help="events to generate (default 60000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (default 1000)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="generator seed (default: a new one per run, so each run adds new users and events; "
        "the same seed gives the same data again)",
    )
    parser.add_argument("--bad-share", type=float, default=0.02, help="share of deliberately bad events")
    args = parser.parse_args(argv)
    if args.events < 1 or args.rate < 0 or not 0 <= args.bad_share <= 1:
        parser.error("need EVENTS >= 1, RATE >= 0 and 0 <= bad share <= 1")

    # Our own handlers, installed before the stack starts: the stack then leaves SIGINT/SIGTERM to us, and the
    # `finally` below stops the services before the stack they depend on.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    settings = load_settings(StackSettings)
    existing = LocalStack.from_state(settings.state_dir)
    reuse = existing is not None and existing.detached and existing.is_running()
    stack = existing if reuse and existing else LocalStack(settings)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    print(f"seed {seed} (SEED={seed} generates this run's data again)")
    run = DemoRun(stack, args.events, args.rate, seed, args.bad_share)
    try:
        if reuse:
            print(f"using the stack `make up` started ({stack.state_file})")
        else:
            print(f"starting the local stack (state and logs in {stack.state_dir}) ...")
            stack.start()
        for name, why in stack.skipped.items():
            print(f"{name}: {why}")
        if stack.prometheus_running:
            print(f"prometheus: {stack.prometheus.url} scrapes every service; alerts at {stack.prometheus.url}/alerts")
        summary = run.execute()
    except PartFailed as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return ExitCode.FAILED
    except ComponentError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return ExitCode.FAILED
    except StackError as error:
        print(f"\nERROR: local stack: {error}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        run.halt_chaos()
        for service in run.services:
            service.stop()
        if reuse and stack.prometheus_running:  # the services are gone: a stack left up scrapes nothing stale
            with contextlib.suppress(OSError):
                stack.prometheus.register_targets({})
        if not reuse:
            stack.stop()
    path = stack.state_dir / "run-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, path)
    spans = traces_file(stack.state_dir)
    if spans.exists():
        print(f"traces: {spans} (`make trace` lists the traced events, `make trace ID=<event id>` prints one)")
    return ExitCode.OK if summary["ok"] else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
