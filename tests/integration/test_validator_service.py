"""The validator service (`python -m services.validator`) and its tools against the local stack.

The declared topics are fixed names shared by the whole session, so every record this test produces carries a
`test-id` header (unique per record) and the checks only look at records with this run's ids: the service
keeps original headers on processed, retry and dead-letter records.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer
from prometheus_client.parser import text_string_to_metric_families

from services.declarations.apply import apply_declarations
from services.generator.bad_events import BAD_KINDS, BadEventGenerator
from services.generator.model import Simulation
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.kit.kafka import committed_offsets, scan_topic
from services.testing.net import free_port, http_status, metric_totals
from services.testing.processes import run_module, start_module, stop, wait_for
from services.validator.cdc import make_envelope

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_ID = "test-id"
# The dead-letter code each bad kind must get (garbage and rogue-schema payloads fail to decode).
EXPECTED_CODES = {
    "null_ids": ("MISSING_FIELD", "event_required_ids"),
    "negative_amount": ("OUT_OF_RANGE", "amount_not_negative"),
    "unknown_user": ("REFERENCE_NOT_FOUND", "user_exists"),  # after the retries ran out
    "duplicate": ("DUPLICATE", "event_id_unique"),
    "future_timestamp": ("FUTURE_TIMESTAMP", "event_time_not_in_future"),
    "wrong_types": ("UNKNOWN_WRITER_SCHEMA", ""),  # not Avro of a known schema: a decode error, no rule
    "garbage_bytes": ("NOT_AVRO_SINGLE_OBJECT", ""),
}


def headers_of(message: Message) -> dict[str, bytes]:
    return {k: (v or b"") for k, v in (message.headers() or [])}


def read_ours(bootstrap: str, topic: str, ids: set[str]) -> list[Message]:
    found: list[Message] = []

    def keep(message: Message) -> None:
        if headers_of(message).get(TEST_ID, b"").decode() in ids:
            found.append(message)

    scan_topic({"bootstrap.servers": bootstrap}, topic, on_message=keep)
    return found


def run_cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_module("services.validator", *args, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def without_validated_at(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "validated_at"}


@pytest.fixture(scope="module")
def declared(stack) -> str:
    report = apply_declarations(REPO_ROOT / "deploy" / "k8s", stack.bootstrap_servers, cap_replication_factor=True)
    assert report.ok, report.table()
    return stack.bootstrap_servers


def start_validator(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m services.validator` with `env`, its output appended to `log_path`; returns once it is ready."""
    port = int(env["HTTP_PORT"])
    process = start_module("services.validator", env=env, log_path=log_path, append=True)

    def ready() -> bool:
        assert process.poll() is None, log_path.read_text()[-4000:]
        return http_status(port, "/readyz") == 200

    wait_for(ready, 90, "the validator to be ready", log_path)
    return process


def stop_validator(process: subprocess.Popen[bytes]) -> None:
    stop(process, timeout=40)


@pytest.fixture
def validator_env(stack, declared) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "CONSUMER_GROUP": f"lp-validator-test-{uuid.uuid4().hex[:8]}",
        "HTTP_PORT": str(free_port()),
        "LOG_FORMAT": "text",
        "VALIDATOR_RETRY_BASE_DELAY_S": "0.5",
        "VALIDATOR_RETRY_MAX_ATTEMPTS": "3",
        "SHUTDOWN_TIMEOUT_S": "20",
    }


@pytest.fixture
def service(validator_env: dict[str, str], tmp_path: Path):
    log_path = tmp_path / "validator.log"
    process = start_validator(validator_env, log_path)
    yield validator_env, int(validator_env["HTTP_PORT"]), log_path, process
    stop_validator(process)


def seed_references(bootstrap: str, sim: Simulation) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for user in sim.users:
        row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
        envelope = make_envelope("r", "users", after=row, ts_ms=int(time.time() * 1000))
        producer.produce(
            "cdc.postgres.users", json.dumps(envelope, default=str).encode(), json.dumps({"user_id": user.user_id})
        )
    for product in sim.products:
        envelope = make_envelope("r", "products", after=asdict(product), ts_ms=int(time.time() * 1000))
        key = json.dumps({"product_id": product.product_id})
        producer.produce("cdc.postgres.products", json.dumps(envelope, default=str).encode(), key)
    assert producer.flush(30) == 0


def test_service_routes_good_and_bad_events_load_and_replay(stack, service, tmp_path: Path) -> None:
    env, port, log_path, process = service
    bootstrap = stack.bootstrap_servers
    started = datetime.now(UTC)
    seed = int(uuid.uuid4().int % 1_000_000)
    sim = Simulation(seed, n_users=40, n_products=30, start_time=started)
    bad = BadEventGenerator(seed, sim.users, sim.products, share=0.0)
    seed_references(bootstrap, sim)
    time.sleep(2)  # the references first (events seen before them retry, which works too, only slower)

    schemas = SchemaRepository.load()
    serialize = AvroSerializer(schemas["raw_event"])
    rogue: dict[str, AvroSerializer] = {}
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    good: dict[str, dict[str, Any]] = {}  # test id -> raw record
    bad_kind: dict[str, str] = {}  # test id -> kind
    bad_payload: dict[str, bytes] = {}
    for i in range(300):
        now = datetime.now(UTC)
        event = sim.next_event(now)
        test_id = uuid.uuid4().hex
        record = event.to_record()
        good[test_id] = record
        bad.observe(event)
        producer.produce("events.raw", serialize(record), event.key, headers=[(TEST_ID, test_id.encode())])
        if i % 20 == 10:  # every kind, several times
            kind = BAD_KINDS[(i // 20) % len(BAD_KINDS)]
            made = bad.make(now, kind)
            if made.payload is not None:
                payload = made.payload
            elif made.writer_schema is None:
                payload = serialize(made.record)
            else:
                if made.kind not in rogue:
                    rogue[made.kind] = AvroSerializer(Schema.from_definition(f"rogue_{kind}", made.writer_schema))
                payload = rogue[made.kind](made.record)
            bad_id = uuid.uuid4().hex
            bad_kind[bad_id] = made.kind
            bad_payload[bad_id] = payload
            producer.produce("events.raw", payload, made.key, headers=[(TEST_ID, bad_id.encode())])
    assert producer.flush(30) == 0
    assert set(bad_kind.values()) == set(BAD_KINDS)

    ids = set(good) | set(bad_kind)

    def all_routed() -> bool:
        assert process.poll() is None, log_path.read_text()[-4000:]
        seen = {
            headers_of(m)[TEST_ID].decode()
            for t in ("events.processed", "events.raw.dlq")
            for m in read_ours(bootstrap, t, ids)
        }
        return seen >= ids

    wait_for(all_routed, 120, "every event to be processed or dead-lettered", log_path)
    time.sleep(2)  # anything duplicated would show by now
    processed = read_ours(bootstrap, "events.processed", ids)
    dead = read_ours(bootstrap, "events.raw.dlq", ids)
    processed_ids = Counter(headers_of(m)[TEST_ID].decode() for m in processed)
    dead_ids = Counter(headers_of(m)[TEST_ID].decode() for m in dead)

    # Every good event once in events.processed, never in the DLQ; every bad one once in the DLQ only.
    assert {i: n for i, n in processed_ids.items() if n != 1} == {}
    assert {i: n for i, n in dead_ids.items() if n != 1} == {}
    assert set(processed_ids) == set(good)
    assert set(dead_ids) == set(bad_kind)

    decode_processed = AvroDeserializer(schemas, "processed_event")
    stream_records: dict[str, dict[str, Any]] = {}
    for message in processed:
        decoded = decode_processed(message.value())
        assert isinstance(decoded, Decoded), decoded
        test_id = headers_of(message)[TEST_ID].decode()
        assert decoded.record["event_id"] == good[test_id]["event_id"]
        assert message.key() == good[test_id]["user_id"].encode()
        stream_records[decoded.record["event_id"]] = decoded.record

    codes_by_kind: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for message in dead:
        headers = headers_of(message)
        test_id = headers[TEST_ID].decode()
        code = headers["lp-dlq-error-code"].decode()
        rule = headers.get("lp-dlq-rule", b"").decode()
        assert code, headers
        assert message.value() == bad_payload[test_id]  # the original bytes, untouched
        assert headers["lp-dlq-original-topic"] == b"events.raw"
        codes_by_kind[bad_kind[test_id]][(code, rule)] += 1
        if bad_kind[test_id] == "unknown_user":  # went through events.raw.retry until the retries ran out
            assert headers["lp-dlq-attempt"] == b"3", headers
    print("dead-letter codes by kind:", dict(codes_by_kind))
    # Delayed retries wait in the retry topic (the runtime holds the partition) instead of circulating: each
    # unknown-user event was written there once per attempt, never more.
    unknown = {test_id for test_id, kind in bad_kind.items() if kind == "unknown_user"}
    retried = Counter(headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "events.raw.retry", unknown))
    assert retried == Counter(dict.fromkeys(unknown, 3)), retried
    assert set(codes_by_kind) == set(BAD_KINDS)
    for kind, counts in codes_by_kind.items():
        assert set(counts) == {EXPECTED_CODES[kind]}, (kind, counts)
    assert process.poll() is None  # garbage did not crash it

    # `load`: the same good events from a JSONL file give the same processed payloads.
    batch = tmp_path / "events.jsonl"
    with batch.open("w") as out:
        for record in good.values():
            out.write(json.dumps(record, default=lambda v: v.isoformat()) + "\n")
    summary = run_cli(env, "load", str(batch), "--source", "generator")
    assert summary["routes"] == {"processed": len(good)}, summary
    loaded: dict[str, dict[str, Any]] = {}

    def from_file(message: Message) -> None:
        if headers_of(message).get("lp-batch-origin", b"").decode().startswith(f"file:{batch}"):
            decoded = decode_processed(message.value())
            assert isinstance(decoded, Decoded)
            loaded[decoded.record["event_id"]] = decoded.record

    scan_topic({"bootstrap.servers": bootstrap}, "events.processed", on_message=from_file)
    assert set(loaded) == set(stream_records)
    for event_id, record in loaded.items():
        assert without_validated_at(record) == without_validated_at(stream_records[event_id])

    # `replay`: a subset of this run's dead letters goes back to events.raw, exactly those, processed once.
    subset_code = "DUPLICATE"  # replayed, they are duplicates again: dead-lettered once more, each once
    expected_subset = {
        headers_of(m)[TEST_ID].decode() for m in dead if headers_of(m)["lp-dlq-error-code"].decode() == subset_code
    }
    assert expected_subset
    since = started.isoformat()
    dry = run_cli(env, "replay", "--code", subset_code, "--since", since, "--dry-run")
    assert dry["would_replay"] == len(expected_subset), dry
    replay_id = uuid.uuid4().hex
    done = run_cli(env, "replay", "--code", subset_code, "--since", since, "--replay-id", replay_id)
    assert done["replayed"] == len(expected_subset), done

    def replayed_ids(topic: str) -> Counter[str]:
        return Counter(
            headers_of(m)[TEST_ID].decode()
            for m in read_ours(bootstrap, topic, expected_subset)
            if headers_of(m).get("lp-replay-id") == replay_id.encode()
        )

    assert replayed_ids("events.raw") == Counter(dict.fromkeys(expected_subset, 1))

    def reprocessed() -> bool:
        return sum((replayed_ids("events.raw.dlq") + replayed_ids("events.processed")).values()) >= len(expected_subset)

    wait_for(reprocessed, 60, "the replayed records to be processed", log_path)
    time.sleep(2)
    again = replayed_ids("events.raw.dlq") + replayed_ids("events.processed")
    assert again == Counter(dict.fromkeys(expected_subset, 1))  # each replayed record processed once

    # A second replay takes the newer dead letters (the first ones are superseded): the same count, not double.
    dry = run_cli(env, "replay", "--code", subset_code, "--since", since, "--dry-run")
    assert dry["would_replay"] == len(expected_subset), dry

    # cdc.postgres.transactions: the generator's purchases as CDC inserts and one status update each, plus an
    # invalid row and a non-JSON value: transactions.processed + status_history, or the transactions DLQ.
    transactions = [e.transaction for e in (sim.next_event(datetime.now(UTC)) for _ in range(3000)) if e.transaction]
    transactions = transactions[:10]
    assert transactions
    cdc = Producer({"bootstrap.servers": bootstrap})
    tx_ids: set[str] = set()
    for lsn, tx in enumerate(transactions, start=1):
        row = asdict(tx)
        test_id = uuid.uuid4().hex
        tx_ids.add(test_id)
        key = json.dumps({"transaction_id": tx.transaction_id})
        created = make_envelope("c", "transactions", after=row, lsn=lsn * 10, ts_ms=int(time.time() * 1000))
        updated = make_envelope("u", "transactions", before=row, after={**row, "status": "cancelled"}, lsn=lsn * 10 + 1)
        for envelope in (created, updated):
            value = json.dumps(envelope, default=str).encode()
            cdc.produce("cdc.postgres.transactions", value, key, headers=[(TEST_ID, test_id.encode())])
    bad_tx = {"negative": uuid.uuid4().hex, "garbage": uuid.uuid4().hex}
    negative = {**asdict(transactions[0]), "transaction_id": str(uuid.uuid4()), "quantity": -1}
    value = json.dumps(make_envelope("c", "transactions", after=negative, lsn=1), default=str).encode()
    cdc.produce("cdc.postgres.transactions", value, b"k", headers=[(TEST_ID, bad_tx["negative"].encode())])
    cdc.produce("cdc.postgres.transactions", b"\x00not json", b"k", headers=[(TEST_ID, bad_tx["garbage"].encode())])
    assert cdc.flush(30) == 0

    def transactions_routed() -> bool:
        seen = {headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "transactions.status_history", tx_ids)}
        dead = read_ours(bootstrap, "cdc.postgres.transactions.dlq", set(bad_tx.values()))
        return seen == tx_ids and len(dead) == 2

    wait_for(transactions_routed, 60, "the transactions to be processed", log_path)
    assert Counter(
        headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "transactions.processed", tx_ids)
    ) == Counter(dict.fromkeys(tx_ids, 2))
    history = read_ours(bootstrap, "transactions.status_history", tx_ids)
    assert len(history) == 2 * len(tx_ids)  # created (no old status) and the update to cancelled
    tx_dead = {
        headers_of(m)[TEST_ID].decode(): headers_of(m)["lp-dlq-error-code"].decode()
        for m in read_ours(bootstrap, "cdc.postgres.transactions.dlq", set(bad_tx.values()))
    }
    print("transaction dead letters:", tx_dead)
    assert tx_dead == {bad_tx["negative"]: "OUT_OF_RANGE", bad_tx["garbage"]: "CDC_BAD_ENVELOPE"}

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "lp_validator_rule_checked_total{" in metrics
    assert 'lp_validator_routed_total{route="processed"}' in metrics
    # dead letters by reason, and the verdicts behind the data-quality score (docs/observability.md)
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    reasons = {dict(labels)["rule"] for name, labels in values if name == "lp_dead_letters_total"}
    assert {"event_time_not_in_future", "amount_not_negative", ""} <= reasons  # failed rules named; decode: none
    assert values[("lp_validator_verdicts_total", (("verdict", "rejected"),))] > 0
    assert 0 < values[("lp_validator_data_quality_ratio", ())] < 1


def with_invalid_utf8(payload: bytes, marker: bytes) -> bytes:
    """`payload` with the first two bytes of `marker` (an ASCII string field's content) replaced by non-UTF-8."""
    at = payload.index(marker)
    return payload[:at] + b"\xff\xfe" + payload[at + 2 :]


def test_hostile_payloads_each_get_their_reason_and_nothing_crashes(stack, service) -> None:
    """Invalid UTF-8, oversized, truncated, empty and null payloads, a bad total and a negative quantity."""
    _env, _port, log_path, process = service
    bootstrap = stack.bootstrap_servers
    seed = int(uuid.uuid4().int % 1_000_000)
    sim = Simulation(seed, n_users=20, n_products=20, start_time=datetime.now(UTC))
    seed_references(bootstrap, sim)
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])

    def good_record() -> dict[str, Any]:
        return sim.next_event(datetime.now(UTC)).to_record()

    marker = b"MARKER" + uuid.uuid4().hex.encode()
    record = {**good_record(), "page_url": marker.decode()}
    valid = serialize(record)
    oversized = serialize({**good_record(), "properties": {"blob": "x" * 100_000}})
    expected: dict[str, tuple[bytes | None, str]] = {  # test id -> (payload, dead-letter code)
        uuid.uuid4().hex: (with_invalid_utf8(valid, marker), "INVALID_UTF8"),
        uuid.uuid4().hex: (oversized, "PAYLOAD_TOO_LARGE"),
        uuid.uuid4().hex: (valid[:-7], "CORRUPT_OR_TRUNCATED"),
        uuid.uuid4().hex: (valid + b"\x00\x01", "TRAILING_BYTES"),
        uuid.uuid4().hex: (b"", "EMPTY_PAYLOAD"),
        uuid.uuid4().hex: (None, "EMPTY_PAYLOAD"),
        uuid.uuid4().hex: (b"\xc3\x01" + bytes(range(256)) * 4, "UNKNOWN_WRITER_SCHEMA"),
    }
    good_ids = {uuid.uuid4().hex: good_record() for _ in range(20)}
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000})
    for test_id, (payload, _code) in expected.items():
        producer.produce("events.raw", payload, b"hostile", headers=[(TEST_ID, test_id.encode())])
    for test_id, good in good_ids.items():
        producer.produce("events.raw", serialize(good), good["user_id"], headers=[(TEST_ID, test_id.encode())])

    # CDC transactions: a total that does not add up, and a negative quantity (bad rows PostgreSQL let through).
    base = next(e.transaction for e in (sim.next_event(datetime.now(UTC)) for _ in range(3000)) if e.transaction)
    assert base is not None
    bad_rows = {
        uuid.uuid4().hex: ({**asdict(base), "transaction_id": str(uuid.uuid4()), "total": 1e9}, "TOTAL_MISMATCH"),
        uuid.uuid4().hex: ({**asdict(base), "transaction_id": str(uuid.uuid4()), "quantity": -3}, "OUT_OF_RANGE"),
    }
    for test_id, (row, _code) in bad_rows.items():
        value = json.dumps(make_envelope("c", "transactions", after=row, lsn=7), default=str).encode()
        key = json.dumps({"transaction_id": row["transaction_id"]}).encode()
        producer.produce("cdc.postgres.transactions", value, key, headers=[(TEST_ID, test_id.encode())])
    assert producer.flush(30) == 0

    event_ids = set(expected) | set(good_ids)

    def routed() -> bool:
        seen = {
            headers_of(m)[TEST_ID].decode()
            for t in ("events.processed", "events.raw.dlq")
            for m in read_ours(bootstrap, t, event_ids)
        }
        tx_dead = read_ours(bootstrap, "cdc.postgres.transactions.dlq", set(bad_rows))
        return seen >= event_ids and len(tx_dead) >= len(bad_rows)

    wait_for(routed, 120, "every hostile record to be routed", log_path)
    time.sleep(1)
    codes = {
        headers_of(m)[TEST_ID].decode(): headers_of(m)["lp-dlq-error-code"].decode()
        for m in read_ours(bootstrap, "events.raw.dlq", event_ids)
    }
    assert codes == {test_id: code for test_id, (_payload, code) in expected.items()}
    dead = read_ours(bootstrap, "events.raw.dlq", set(expected))
    for message in dead:  # the original bytes, whatever they were
        assert (message.value() or b"") == (expected[headers_of(message)[TEST_ID].decode()][0] or b"")
        assert headers_of(message)["lp-dlq-message"], headers_of(message)
    processed = Counter(headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "events.processed", event_ids))
    assert processed == Counter(dict.fromkeys(good_ids, 1))
    tx_codes = {
        headers_of(m)[TEST_ID].decode(): (headers_of(m)["lp-dlq-error-code"].decode(), headers_of(m)["lp-dlq-rule"])
        for m in read_ours(bootstrap, "cdc.postgres.transactions.dlq", set(bad_rows))
    }
    assert {k: v[0] for k, v in tx_codes.items()} == {k: code for k, (_row, code) in bad_rows.items()}
    assert all(rule for _code, rule in tx_codes.values())  # a rule failed: it is named
    assert process.poll() is None, log_path.read_text()[-4000:]  # nothing crashed it


NOT_HEX = "0542cfdb-1c2d-4e5f-93v2-0123456789ab"  # the shape of a UUID, one digit not hexadecimal
ID_FIELDS = ("event_id", "user_id", "session_id", "product_id", "transaction_id")
# Payload sizes around the limit: the validator's producer takes PRODUCER_MAX_REQUEST_BYTES (default 1,048,588, the
# broker's message.max.bytes) less 2 KiB of headroom; a dead letter (value + ~1 KiB of headers) up to it is whole.
WHOLE_SIZES = (998_000, 1_000_000, 1_044_000)  # the old failure began at ~1 MB; the last is just below the limit
CUT_SIZES = (1_047_000, 1_300_000)  # at/just above the limit (the dead letter would not fit), and well above


def test_hostile_ids_and_1_mb_payloads_are_dead_lettered_at_the_validator_with_their_reason(stack, service) -> None:
    """Non-UUID ids, control bytes in ids, case-changed copies of accepted events, ~1 MB payloads, bad CDC ids:
    each dead-lettered by the validator with its code and rule; good events processed once, with canonical ids."""
    _env, _port, log_path, process = service
    bootstrap = stack.bootstrap_servers
    sim = Simulation(int(uuid.uuid4().int % 1_000_000), n_users=20, n_products=20, start_time=datetime.now(UTC))
    seed_references(bootstrap, sim)
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000})

    def send(record: dict[str, Any], test_id: str, payload: bytes | None = None) -> None:
        value = payload if payload is not None else serialize(record)
        producer.produce("events.raw", value, record["user_id"].lower(), headers=[(TEST_ID, test_id.encode())])

    def routed(ids: set[str]) -> Callable[[], bool]:
        def all_there() -> bool:
            seen = {
                headers_of(m)[TEST_ID].decode()
                for topic in ("events.processed", "events.raw.dlq")
                for m in read_ours(bootstrap, topic, ids)
            }
            return seen >= ids

        return all_there

    # 1. Events that are accepted first: their case-changed copies come later.
    originals = {uuid.uuid4().hex: sim.next_event(datetime.now(UTC)).to_record() for _ in range(5)}
    for test_id, record in originals.items():
        send(record, test_id)
    assert producer.flush(30) == 0
    wait_for(routed(set(originals)), 120, "the original events to be processed", log_path)

    # 2. The hostile records, and good events among them. test id -> (code, rule, field)
    expected: dict[str, tuple[str, str, str]] = {}
    payloads: dict[str, bytes] = {}
    for field in ID_FIELDS:  # a non-hex digit in each id
        test_id = uuid.uuid4().hex
        send({**sim.next_event(datetime.now(UTC)).to_record(), field: NOT_HEX}, test_id)
        expected[test_id] = ("NOT_A_UUID", "event_ids_uuid", field)
    for field, bad in (("event_id", "\x00"), ("user_id", "\x1b"), ("session_id", "\n"), ("product_id", "\x7f")):
        record = sim.next_event(datetime.now(UTC)).to_record()
        base = record[field] or str(uuid.uuid4())
        test_id = uuid.uuid4().hex
        send({**record, field: base[:8] + bad + base[9:]}, test_id)
        expected[test_id] = ("CONTROL_CHARACTER", "event_ids_uuid", field)
    for original in list(originals.values())[:3]:  # same event, upper-case id, other contents: a duplicate
        test_id = uuid.uuid4().hex
        crafted = {**original, "event_id": original["event_id"].upper(), "page_url": "/crafted"}
        send(crafted, test_id)
        expected[test_id] = ("DUPLICATE", "event_id_unique", "event_id")
    for size in (*WHOLE_SIZES, *CUT_SIZES):
        test_id = uuid.uuid4().hex
        payloads[test_id] = b"\xc3\x01" + os.urandom(size - 2)
        send({"user_id": str(uuid.uuid4())}, test_id, payloads[test_id])
        expected[test_id] = ("PAYLOAD_TOO_LARGE", "", "")
    good = {uuid.uuid4().hex: sim.next_event(datetime.now(UTC)).to_record() for _ in range(20)}
    upper = {uuid.uuid4().hex: sim.next_event(datetime.now(UTC)).to_record() for _ in range(3)}
    for test_id, record in good.items():
        send(record, test_id)
    for test_id, record in upper.items():  # upper-case ids of a new event: the same UUIDs, accepted, normalised
        send({**record, **{f: record[f].upper() for f in ID_FIELDS if record[f]}}, test_id)
    # CDC: a users row whose key is not a UUID; a transaction with a control byte in its id
    user = {k: v for k, v in asdict(sim.users[0]).items() if k != "shipping_address"} | {"user_id": NOT_HEX}
    user_test_id = uuid.uuid4().hex
    envelope = json.dumps(make_envelope("c", "users", after=user, lsn=9), default=str).encode()
    producer.produce("cdc.postgres.users", envelope, None, headers=[(TEST_ID, user_test_id.encode())])
    base = next(e.transaction for e in (sim.next_event(datetime.now(UTC)) for _ in range(3000)) if e.transaction)
    assert base is not None
    row = {**asdict(base), "transaction_id": str(uuid.uuid4())[:-1] + "\x00"}
    tx_test_id = uuid.uuid4().hex
    envelope = json.dumps(make_envelope("c", "transactions", after=row, lsn=7), default=str).encode()
    producer.produce("cdc.postgres.transactions", envelope, None, headers=[(TEST_ID, tx_test_id.encode())])
    assert producer.flush(60) == 0

    all_ids = set(expected) | set(good) | set(upper) | set(originals)
    wait_for(routed(all_ids), 180, "every hostile record to be routed", log_path)
    time.sleep(1)  # nothing more is coming: a record routed twice would show now

    dead = read_ours(bootstrap, "events.raw.dlq", all_ids)
    reasons = Counter(
        (
            headers_of(m)[TEST_ID].decode(),
            (h := headers_of(m))["lp-dlq-error-code"].decode(),
            h["lp-dlq-rule"].decode(),
            h["lp-dlq-field"].decode(),
        )
        for m in dead
    )
    print("hostile dead letters:", Counter((code, rule) for _id, code, rule, _f in reasons))
    assert reasons == Counter((test_id, *reason) for test_id, reason in expected.items())  # each once, its reason
    for message in dead:
        test_id = headers_of(message)[TEST_ID].decode()
        if test_id not in payloads:
            continue
        headers, size = headers_of(message), len(payloads[test_id])
        if size in WHOLE_SIZES:  # kept byte for byte
            assert message.value() == payloads[test_id] and "lp-dlq-value-truncated-from" not in headers
        else:  # cut as the last resort, and said so
            assert headers["lp-dlq-value-truncated-from"] == str(size).encode()
            assert headers["lp-dlq-value-sha256"] == hashlib.sha256(payloads[test_id]).hexdigest().encode()
            assert payloads[test_id].startswith(message.value()) and len(message.value()) > 1_000_000

    processed = read_ours(bootstrap, "events.processed", all_ids)
    assert Counter(headers_of(m)[TEST_ID].decode() for m in processed) == Counter(
        dict.fromkeys(set(good) | set(upper) | set(originals), 1)
    )
    decode = AvroDeserializer(SchemaRepository.load(), "processed_event")
    by_test_id = {}
    for message in processed:
        decoded = decode(message.value())
        assert isinstance(decoded, Decoded)
        by_test_id[headers_of(message)[TEST_ID].decode()] = decoded.record
        for field in ID_FIELDS:  # what a store's UUID column would refuse never leaves the validator
            value = decoded.record[field]
            assert value is None or str(uuid.UUID(value)) == value, (field, value)
    for test_id, record in originals.items():  # the crafted copies replaced nothing
        assert by_test_id[test_id]["page_url"] == record["page_url"] != "/crafted"
    for test_id, record in upper.items():
        assert by_test_id[test_id]["event_id"] == record["event_id"]  # carried on in canonical form

    (user_dead,) = read_ours(bootstrap, "cdc.postgres.users.dlq", {user_test_id})
    assert (headers_of(user_dead)["lp-dlq-error-code"], headers_of(user_dead)["lp-dlq-field"]) == (
        b"NOT_A_UUID",
        b"user_id",
    )
    (tx_dead,) = read_ours(bootstrap, "cdc.postgres.transactions.dlq", {tx_test_id})
    assert (headers_of(tx_dead)["lp-dlq-error-code"], headers_of(tx_dead)["lp-dlq-rule"]) == (
        b"CONTROL_CHARACTER",
        b"transaction_ids_uuid",
    )
    assert not read_ours(bootstrap, "transactions.processed", {tx_test_id})
    assert process.poll() is None, log_path.read_text()[-4000:]


def test_kill_9_mid_stream_then_restart_loses_nothing(stack, validator_env: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL while a load is processed, restart with the same group: every event processed (at least once),
    and the restarted worker still knows every user and product (none wrongly dead-lettered as unknown).

    The load is in the log before the worker starts, and the kill follows the worker's own record counter
    (polled every 20 ms), so the kill always lands with most of the backlog unprocessed, however fast or
    loaded the machine: scanning the output topic to decide when to kill took long enough under load for
    the worker to finish first."""
    bootstrap = stack.bootstrap_servers
    log_path = tmp_path / "validator.log"
    seed = int(uuid.uuid4().int % 1_000_000)
    sim = Simulation(seed, n_users=300, n_products=100, start_time=datetime.now(UTC))
    seed_references(bootstrap, sim)
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    ids: set[str] = set()
    for _ in range(40_000):
        event = sim.next_event(datetime.now(UTC))
        test_id = uuid.uuid4().hex
        ids.add(test_id)
        producer.produce("events.raw", serialize(event.to_record()), event.key, headers=[(TEST_ID, test_id.encode())])
        producer.poll(0)
    assert producer.flush(60) == 0
    port = int(validator_env["HTTP_PORT"])

    def records_done() -> float:
        return metric_totals(port).get("lp_validator_runtime_records_total", 0.0)

    def processed_ids() -> Counter[str]:
        return Counter(headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "events.processed", ids))

    process = start_validator(validator_env, log_path)
    try:
        # the 400 users and products of seed_references count too: 2,000 means events are being processed
        wait_for(lambda: records_done() >= 2_000, 120, "the first events to be processed", log_path, poll_s=0.02)
        process.kill()
        process.wait(10)
        assert len(processed_ids()) < len(ids), "all processed before the kill: the test proves nothing"
        process = start_validator(validator_env, log_path)
        wait_for(lambda: len(processed_ids()) >= len(ids), 240, "every event after the restart", log_path)
        counts = processed_ids()
        dead = read_ours(bootstrap, "events.raw.dlq", ids)
        assert set(counts) == ids
        assert not dead, Counter(headers_of(m)["lp-dlq-error-code"].decode() for m in dead)
        print(f"replayed after kill -9 (at least once): {sum(counts.values()) - len(ids)} duplicates")
    finally:
        stop_validator(process)


def test_a_duplicate_of_an_event_accepted_before_a_kill_9_is_still_a_duplicate(
    stack, validator_env: dict[str, str], tmp_path: Path
) -> None:
    """An event is accepted and its input committed, the worker is killed (-9) and restarted: copies of the
    event arriving then (same event_id, and the event_id in upper case) are dead-lettered as DUPLICATE /
    event_id_unique, because the restarted worker read the duplicate window back from events.processed;
    events.processed holds the event once. (Before, the memory started empty and the copy was a second row.)"""
    bootstrap = stack.bootstrap_servers
    log_path = tmp_path / "validator.log"
    seed = int(uuid.uuid4().int % 1_000_000)
    sim = Simulation(seed, n_users=20, n_products=20, start_time=datetime.now(UTC))
    seed_references(bootstrap, sim)
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    decode = AvroDeserializer(SchemaRepository.load(), "processed_event")
    producer = Producer({"bootstrap.servers": bootstrap})
    delivered: list[Message] = []

    def produce(record: dict[str, Any], key: bytes | str, test_id: str) -> None:
        def on_delivery(error: Any, message: Message) -> None:
            assert error is None, error
            delivered.append(message)

        producer.produce(
            "events.raw", serialize(record), key, headers=[(TEST_ID, test_id.encode())], on_delivery=on_delivery
        )
        assert producer.flush(30) == 0

    run = uuid.uuid4().hex[:8]  # the topics are shared by the session: test ids unique to this run
    first, later_id = f"{run}-original", f"{run}-later"
    event = sim.next_event(datetime.now(UTC))
    original = event.to_record()
    event_id = original["event_id"]
    assert event_id == event_id.lower()
    process = start_validator(validator_env, log_path)
    try:
        produce(original, event.key, first)
        (sent,) = delivered
        wait_for(lambda: read_ours(bootstrap, "events.processed", {first}), 60, "the original", log_path)
        position = (sent.topic(), sent.partition())
        group = validator_env["CONSUMER_GROUP"]

        def committed() -> bool:
            return committed_offsets({"bootstrap.servers": bootstrap}, group, [position])[position] > sent.offset()

        wait_for(committed, 30, "the original's input to be committed", log_path)  # not read again after the kill
        process.kill()
        process.wait(10)
        process = start_validator(validator_env, log_path)

        copy_ids = {f"{run}-same-id": event_id, f"{run}-upper-case-id": event_id.upper()}
        for test_id, copy_event_id in copy_ids.items():
            produce({**original, "event_id": copy_event_id}, event.key, test_id)
        later = sim.next_event(datetime.now(UTC))  # a new event after the copies: the worker is processing
        produce(later.to_record(), later.key, later_id)
        ours = {first, later_id, *copy_ids}

        def routed() -> bool:
            seen = {headers_of(m)[TEST_ID].decode() for m in read_ours(bootstrap, "events.raw.dlq", ours)}
            return seen >= set(copy_ids) and bool(read_ours(bootstrap, "events.processed", {later_id}))

        wait_for(routed, 90, "the copies to be dead-lettered and the later event processed", log_path)
        time.sleep(2)  # anything else would show by now
        processed = read_ours(bootstrap, "events.processed", ours)
        assert sorted(headers_of(m)[TEST_ID].decode() for m in processed) == sorted([later_id, first])
        event_ids = [decode(m.value()).record["event_id"] for m in processed]  # type: ignore[union-attr]
        assert event_ids.count(event_id) == 1
        dead = read_ours(bootstrap, "events.raw.dlq", ours)
        reasons = {
            headers_of(m)[TEST_ID].decode(): (headers_of(m)["lp-dlq-error-code"], headers_of(m)["lp-dlq-rule"])
            for m in dead
        }
        assert reasons == dict.fromkeys(copy_ids, (b"DUPLICATE", b"event_id_unique")), reasons
        assert len(dead) == 2
        assert "duplicate memory rebuilt" in log_path.read_text()
    finally:
        stop_validator(process)
