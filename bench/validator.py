"""The validator service's events/s per process against the bare consume-then-produce ceiling, same client.

All figures read the same records: distinct generator events (Avro, zstd, 16 partitions of `events.raw` as
declared), with every user and product known from the CDC topics, so each event runs the whole path (decode,
every rule incl. lookups and the duplicate window, enrichment, e-mail hashing, encode, produce, commit):

- ceiling: bare aiokafka consume-then-produce of the same records (`bench.validator_runtime._bare_loop`), the
  client the runtime uses, without any processing.
- service: `python -m services.validator` (the real service, its defaults), from its first processed record to
  its last, read from its `/metrics`.
- per-record peer: the same rules and enrichment written as a quix-streams user would, one record at a time
  (`bench.validator_peer`, its own process and virtualenv), over the same records on the same broker; the service
  is also reported as a multiple of it.
- processor in-process: `ValidatorProcessor` alone over the same records, no Kafka: the share of the cost that
  is validation itself, which says what limits the service.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka.admin import AdminClient

from bench.harness import BenchContext, Result, produce_all
from bench.validator_peer import peer_rate
from bench.validator_runtime import _bare_loop, _create_topics, worker_rate
from services.contracts.topics import CDC_PRODUCTS, CDC_USERS, EVENTS_PROCESSED, EVENTS_RAW
from services.declarations.apply import apply_declarations
from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.memory import tune_gc_for_throughput
from services.kit.paths import repo_root
from services.testing.net import free_port
from services.validator.cdc import make_envelope
from services.validator.runtime import Record, StreamRuntimeSettings

ROUNDS = 2
SEED = 11


def _events(count: int) -> tuple[Simulation, list[tuple[bytes, bytes]]]:
    simulation = Simulation(SEED, 1000, 500, start_time=datetime.now(UTC))
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    now = datetime.now(UTC)
    return simulation, [(e.key, serialize(e.to_record())) for e in (simulation.next_event(now) for _ in range(count))]


def _seed_references(bootstrap: str, simulation: Simulation) -> None:
    stamp = int(time.time() * 1000)
    users = []
    for user in simulation.users:
        row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
        envelope = make_envelope("r", "users", after=row, ts_ms=stamp)
        users.append((json.dumps({"user_id": user.user_id}), json.dumps(envelope, default=str).encode()))
    products = []
    for product in simulation.products:
        envelope = make_envelope("r", "products", after=asdict(product), ts_ms=stamp)
        products.append((json.dumps({"product_id": product.product_id}), json.dumps(envelope, default=str).encode()))
    produce_all(bootstrap, CDC_USERS, users)
    produce_all(bootstrap, CDC_PRODUCTS, products)


def recreate_topic(bootstrap: str, topic: str) -> None:
    """`topic` emptied: deleted if it exists, then declared again from deploy/k8s."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=10).topics:
        for future in admin.delete_topics([topic], operation_timeout=30).values():
            future.result()
    report = apply_declarations(repo_root() / "deploy" / "k8s", bootstrap, cap_replication_factor=True)
    if not report.ok:
        raise RuntimeError(f"declarations not applied:\n{report.table()}")


def _forget_accepted(bootstrap: str) -> None:
    """An empty events.processed: the service reads back what it accepted before (its duplicate memory), so a
    second run over the same events would otherwise find every one a duplicate and measure dead-lettering."""
    recreate_topic(bootstrap, EVENTS_PROCESSED)


def _service_rate(env: dict[str, str], events: int, work_dir: Path) -> float:
    _forget_accepted(env["KAFKA_BOOTSTRAP_SERVERS"])
    port = free_port()
    run_env = {
        **os.environ,
        "LOG_LEVEL": "WARNING",
        **env,
        "CONSUMER_GROUP": f"bench-validator-{time.time_ns()}",
        "HTTP_PORT": str(port),
    }
    return worker_rate(["services.validator"], run_env, port, EVENTS_RAW, events, work_dir / "validator-bench.log")


def _processor_rate(simulation: Simulation, records: list[tuple[bytes, bytes]]) -> float:
    """The processor alone, as the service runs it (batches of its BATCH_MAX_RECORDS, its GC settings), no Kafka."""
    from services.validator.processor import ValidatorProcessor
    from services.validator.rulebook import RuleBook

    size = StreamRuntimeSettings.model_fields["batch_max_records"].default
    processor = ValidatorProcessor(RuleBook(), SchemaRepository.load())
    for user in simulation.users:
        processor.references.put("users", {k: v for k, v in asdict(user).items() if k != "shipping_address"})
    for product in simulation.products:
        processor.references.put("products", asdict(product))
    batch = [Record(EVENTS_RAW, 0, offset, key, value) for offset, (key, value) in enumerate(records)]
    warm, batch = batch[:size], batch[size:]  # first calls compile regexes and fill the block caches
    processor(warm)
    thresholds = gc.get_threshold()
    tune_gc_for_throughput()
    try:
        started = time.perf_counter()
        for start in range(0, len(batch), size):
            processor(batch[start : start + size])
        return len(batch) / (time.perf_counter() - started)
    finally:  # the benchmarks after this one run with the interpreter's defaults
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def run(ctx: BenchContext) -> list[Result]:
    events = max(30_000, int(200_000 * ctx.scale))  # ~3 s of the service: the first batch and the 50 ms
    # polling of one counter of its /metrics (`worker_rate`) each blur the rate by under 2 %
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    report = apply_declarations(repo_root() / "deploy" / "k8s", bootstrap, cap_replication_factor=True)
    if not report.ok:
        raise RuntimeError(f"declarations not applied:\n{report.table()}")
    simulation, records = _events(events)
    _seed_references(bootstrap, simulation)
    produce_all(bootstrap, EVENTS_RAW, records)
    work_dir = Path(tempfile.mkdtemp(prefix="validator-", dir=ctx.work_dir))
    ceilings, services, peers = [], [], []
    for round_ in range(ROUNDS):  # alternate and keep the best of each: the machine is small and shared
        bare_out = f"bench.validator.bare.{time.time_ns()}.{round_}"
        _create_topics(bootstrap, bare_out)
        ceilings.append(asyncio.run(_bare_loop(bootstrap, EVENTS_RAW, bare_out, events)))
        services.append(_service_rate(ctx.env, events, work_dir))
        peers.append(peer_rate(bootstrap, events, work_dir))
    ceiling, service, peer = max(ceilings), max(services), max(peers)
    in_process = _processor_rate(simulation, records[: min(len(records), 60_000)])
    spread = ", ".join(f"{s:,.0f}/{c:,.0f}" for s, c in zip(services, ceilings, strict=True))
    return [
        Result(
            "validator service events/s",
            round(service),
            "events/s",
            round(ceiling),
            "bare aiokafka consume-then-produce of the same records",
            note=f"{events} distinct events, all rules, lookups, enrichment; 1 process, best of {ROUNDS} "
            f"(runs: {spread})",
        ),
        Result(
            "validator processor in-process events/s",
            round(in_process),
            "events/s",
            round(ceiling),
            "bare aiokafka consume-then-produce of the same records",
            note="decode + rules + enrich + encode only, no Kafka; batches of BATCH_MAX_RECORDS, the service's GC "
            "settings: the share of the service's time that is validation",
        ),
        Result(
            "per-record peer (quix-streams) events/s",
            round(peer),
            "events/s",
            round(ceiling),
            "bare aiokafka consume-then-produce of the same records",
            note=f"same rules and enrichment, one record at a time, as a quix-streams app (bench/validator_peer.py); "
            f"best of {ROUNDS} (runs: {', '.join(f'{p:,.0f}' for p in peers)})",
        ),
        Result(
            "validator service vs per-record peer",
            round(service),
            "events/s",
            round(peer),
            "the per-record quix-streams peer, same events and broker",
            note="ratio: the service's rate as a multiple of the peer's",
        ),
    ]


if __name__ == "__main__":  # this benchmark alone: python -m bench.validator
    from services.stack import LocalStack, StackSettings

    with (
        tempfile.TemporaryDirectory(prefix="lp-bench-") as work,
        LocalStack(StackSettings.with_free_ports(state_dir=Path(work) / "stack"), only=["broker"]) as stack,
    ):
        for result in run(BenchContext(stack.env(), float(os.environ.get("BENCH_SCALE", "1")), Path(work))):
            print(f"{result.name}: {result.value:,.0f} {result.unit} (ceiling {result.ceiling:,.0f}, {result.ratio})")
