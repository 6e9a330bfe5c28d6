"""Differential verdicts of the validator: the same generated input through two engines, record for record.

Issue 13 replaces the validator's per-record rule engine with a columnar one. Before the old one goes, this pins
down what it does, so the new one can be held to it:

- `differential_corpus(events, seed)` generates the validator's input, deterministically, as the batches the
  streaming runtime hands over (one topic each): the users/products snapshot on the CDC topics, then raw events
  of the generator's model with its fault injection on (every `bad_events.BAD_KINDS` kind) mixed with the hostile
  payloads of the validator's tests, CDC transactions (good ones, their status changes and deletes, and bad
  ones), reference changes (late users and products, deletes, updates, bad envelopes), duplicates inside a batch
  and across batch boundaries (also case-changed), replays, and forged retry records. Every corpus-made case
  carries its name in the generator's `lp-injected-fault` header (the validator never reads it).
- `run_verdicts(processor, corpus, clock)` feeds it batch by batch to the processor (`prepare`, then the batch
  call) on a fake clock that only moves forward, and feeds retries back on `events.raw.retry` when they are due,
  holding each retry partition at its first record not due as the runtime does (every 7th time it hands over
  one early, as the batch tools do, so the not-due path runs too). It yields one `Verdict` per input record.
- `record` writes the verdicts as gzip JSON lines (first line: how to regenerate the corpus); `compare` runs the
  processor again and reports the records compared, the differences, and the first ones side by side.

`differential_processor` is the one place that builds the processor under test.

    python -m services.testing.verdicts record --events 1000000 --out /work/differential-old-1M.jsonl.gz
    python -m services.testing.verdicts compare /work/differential-old-1M.jsonl.gz   # exit 1 on any difference

tests/golden/validator_verdicts.jsonl.gz is a small recording that `make test` checks
(tests/unit/test_validator_differential.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import heapq
import json
import math
import random
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from services.contracts.deadletter import parse_dead_letter
from services.contracts.headers import (
    DLQ_ERROR_CODE,
    DLQ_MESSAGE,
    DLQ_ORIGINAL_TOPIC,
    INJECTED_FAULT,
    PRODUCER,
    REPLAY_ID,
    REPLAY_SOURCE,
    RETRY_ATTEMPT,
    RETRY_FIRST_SEEN,
    RETRY_NOT_BEFORE,
    RETRY_ORIGINAL_OFFSET,
    RETRY_ORIGINAL_PARTITION,
    RETRY_ORIGINAL_TOPIC,
    RETRY_RULE,
    TRACEPARENT,
)
from services.contracts.topics import (
    CDC_PRODUCTS,
    CDC_TRANSACTIONS,
    CDC_USERS,
    EVENTS_PROCESSED,
    EVENTS_RAW,
    EVENTS_RAW_RETRY,
    TRANSACTIONS_PROCESSED,
    TRANSACTIONS_STATUS_HISTORY,
    is_dead_letter_topic,
)
from services.generator.bad_events import BadEventGenerator
from services.generator.model import Event, Simulation, Transaction, random_ipv4, uuid4_str
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository, WriterSchema
from services.kit.paths import avro_schema_dir, repo_root
from services.validator.cdc import make_envelope
from services.validator.processor import DEAD_LETTER_HEADROOM_BYTES, ValidatorProcessor
from services.validator.retry import parse_retry_headers
from services.validator.rulebook import RuleBook
from services.validator.runtime import Output, Record, StreamRuntimeSettings

FORMAT = 1  # of the recording; a change that alters rows for the same processor bumps it
GOLDEN = repo_root() / "tests" / "golden" / "validator_verdicts.jsonl.gz"
GOLDEN_EVENTS, GOLDEN_SEED = 20_000, 13

START = datetime(2026, 1, 5, 12, tzinfo=UTC)  # a Monday noon; a million events run into the next morning
USERS, PRODUCTS = 1000, 500
EVENT_PARTITIONS, REFERENCE_PARTITIONS, TRANSACTION_PARTITIONS = 16, 3, 4
RETRY_PARTITIONS = 4  # fed-back retries; the corpus' own (forged) retry records are on the two partitions after
MAX_BATCH = 3000
MEAN_SPACING_MS = 40  # producer time between events: 20k events ~ 15 minutes, 1M ~ 12 hours
GAP_EVERY = 20  # every 20th event batch follows a quiet 16-40 minutes (past the duplicate window and retry age)
SPECIAL_EVERY = 150  # one hostile case per 150 events of a batch, plus one per batch
BAD_SHARE = 0.03  # the generator's injected faults
HELD_BACK = 0.1  # users and products not in the snapshot: their row comes after their first event
MAX_EVENT_BYTES = 65_536  # ValidatorSettings.validator_max_event_bytes' default
MAX_RECORD_BYTES = (
    StreamRuntimeSettings.model_fields["producer_max_request_bytes"].default - DEAD_LETTER_HEADROOM_BYTES
)  # processor.dead_letter_budget of the default settings
CASE = INJECTED_FAULT  # the header naming a corpus record's case

NOT_HEX = "0542cfdb-1c2d-4e5f-93v2-0123456789ab"  # a UUID's shape, one digit not hexadecimal
ID_FIELDS = ("event_id", "user_id", "session_id", "product_id", "transaction_id")
CONTROL_CHARACTERS = ("\x00", "\x1b", "\x7f", "\x85", "\t")
WHOLE_AND_CUT_SIZES = (998_000, 1_000_000, 1_044_000, 1_047_000, 1_300_000)  # tests/unit/validator/test_size_boundary

# An older raw_event writer (before `source` and `properties`): what a producer not yet upgraded sends. The schema
# store knows it (the resolver of `differential_processor`), so its events decode through schema resolution.
_RAW_EVENT = json.loads((avro_schema_dir() / "raw_event.avsc").read_text())
OLDER_RAW_EVENT: dict[str, Any] = {
    **_RAW_EVENT,
    "fields": [f for f in _RAW_EVENT["fields"] if f["name"] not in ("source", "properties")],
}
OLDER_RAW_EVENT_SCHEMA = Schema.from_definition("raw_event", OLDER_RAW_EVENT)


# --- the processor under test ----------------------------------------------------------------------------------
class FakeClock:
    """The engine's clock: a fixed time that only `run_verdicts` moves (forward), so no verdict reads wall time."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class BatchProcessor(Protocol):
    """What `run_verdicts` drives: a `runtime.Processor` whose engine's clock can be set."""

    engine: Any

    def __call__(self, batch: list[Record], /) -> list[Output]: ...


def older_writer_resolver(fingerprint: int) -> WriterSchema | None:
    """The schema store of the differential run: it knows the older raw_event writer, nothing else."""
    if fingerprint == OLDER_RAW_EVENT_SCHEMA.fingerprint:
        return WriterSchema("raw_event", OLDER_RAW_EVENT)
    return None


def differential_processor(clock: FakeClock) -> BatchProcessor:
    """The processor under test, as the service builds it (`processor.make_processor`) but with the references
    coming through the CDC topics of the corpus instead of a `ReferenceFeed`, and the run's clock."""
    processor = ValidatorProcessor(
        RuleBook(),
        SchemaRepository.load(resolver=older_writer_resolver),
        max_event_bytes=MAX_EVENT_BYTES,
        max_record_bytes=MAX_RECORD_BYTES,
    )
    processor.engine.clock = clock
    return processor


# --- the corpus ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Batch:
    at: datetime  # the clock when the batch is handed over
    records: list[Record]  # of one topic, in offset order per partition


@dataclass(slots=True)
class _Item:
    """An events.raw record before it has a position."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    when: datetime
    record: dict[str, Any] | None = None  # the raw_event it encodes, when it is a well-formed one


@dataclass(slots=True)
class _Plan:
    """A fresh user or product whose next events are rewritten to it (from `start` on)."""

    id: str
    start: datetime
    remaining: int
    country: str | None = None


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _floor_ms(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


def mutate_id(rng: random.Random, value: str) -> str:
    """One of the hostile edits of an id seen in the wild (tests/unit/validator/test_ids.py): a non-hex digit, a
    control byte, a case change, a cut, a shift, something appended."""
    at = rng.randrange(len(value))
    match rng.randrange(6):
        case 0:
            return value[:at] + rng.choice("gvxz") + value[at + 1 :]
        case 1:
            return value[:at] + chr(rng.choice([0, 1, 9, 10, 13, 27, 127, 0x85])) + value[at + 1 :]
        case 2:
            return value.upper()
        case 3:
            return value[:at]
        case 4:
            return value[:at] + value[at + 1 :] + rng.choice("0a-")
        case _:
            return value + rng.choice(["", " ", "\x00", "0"])


EVENT_CASES = (
    "invalid_utf8",
    "oversized",
    "oversized_1mb",
    "at_size_limit",
    "over_size_limit",
    "truncated",
    "trailing_bytes",
    "empty_value",
    "null_value",
    "unknown_fingerprint",
    "other_subject",
    "not_avro",
    "header_only",
    "older_writer",
    "id_not_uuid",
    "id_control_character",
    "id_upper_case",
    "id_mutated",
    "event_id_empty",
    "event_type_unknown",
    "event_type_null",
    "amount_nan",
    "price_infinite",
    "quantity_out_of_range",
    "price_negative",
    "warn_flags",
    "purchase_without_transaction",
    "product_view_without_product",
    "email_in_properties",
    "future_at_limit",
    "future_over_limit",
    "before_epoch",
    "old_then_copy",
    "dup_in_batch",
    "dup_case_changed",
    "dup_after_rejected",
    "dup_of_retrying",
    "dup_old",
    "replay",
    "replay_of_accepted",
    "forged_retry_headers",
    "stale_dead_letter_headers",
    "no_key_no_headers",
)
TRANSACTION_CASES = (
    "tx_total_mismatch",
    "tx_bad_uuid",
    "tx_control_character",
    "tx_upper_case",
    "tx_negative_quantity",
    "tx_unknown_status",
    "tx_discount_flag",
    "tx_negative_total",
    "tx_missing_status",
    "tx_not_json",
    "tx_invalid_utf8",
    "tx_json_array",
    "tx_bad_op",
    "tx_update_without_after",
    "tx_delete_without_before",
    "tx_delete_bad_uuid",
    "tx_bad_decimal",
    "tx_beyond_decimal",
    "tx_no_timestamps",
    "tx_snapshot",
    "tx_same_status",
    "tx_wrapped",
    "tx_tombstone_only",
)
REFERENCE_CASES = (
    "ref_not_json",
    "ref_bad_uuid",
    "ref_control_character",
    "ref_bad_date",
    "ref_bad_price",
    "ref_tombstone_unknown",
    "ref_plain_key",
    "ref_bad_key",
    "ref_wrapped",
    "ref_stale",
    "ref_bad_op",
)
RETRY_CASES = ("retry_garbage", "retry_unreadable_headers", "retry_not_due", "retry_last_attempt", "retry_found_now")


class _Corpus:
    """The generator of `differential_corpus`; all of its randomness comes from `seed`."""

    def __init__(self, events: int, seed: int) -> None:
        self.events = events
        self.rng = rng = random.Random(f"differential/{seed}")
        self.sim = Simulation(seed, USERS, PRODUCTS, start_time=START)
        self.bad = BadEventGenerator(seed, self.sim.users, self.sim.products, share=BAD_SHARE)
        schemas = SchemaRepository.load()
        self.serialize = AvroSerializer(schemas["raw_event"])
        self.serialize_rogue = AvroSerializer(Schema.from_definition("rogue_wrong_types", self.bad.rogue_schema))
        self.serialize_older = AvroSerializer(OLDER_RAW_EVENT_SCHEMA)
        self.serialize_foreign = AvroSerializer(schemas["transaction_status_change"])
        self.offsets: Counter[tuple[str, int]] = Counter()
        self.lsn = 0
        self.cursor = START  # producer time
        self.at = START  # the clock of the last batch
        self.emitted = 0  # events.raw records so far
        self.batch_no = 0
        self.flush_no = 0
        self.case_no: Counter[str] = Counter()  # round robin per case family

        held_users = set(rng.sample(range(USERS), int(USERS * HELD_BACK)))
        held_products = set(rng.sample(range(PRODUCTS), int(PRODUCTS * HELD_BACK)))
        self.stable_users = [u for i, u in enumerate(self.sim.users) if i not in held_users]
        self.stable_products = [p for i, p in enumerate(self.sim.products) if i not in held_products]
        # Held back until their first event: then their row is scheduled (mostly soon enough for a retry).
        self.waiting_users = {u.user_id: u for i, u in enumerate(self.sim.users) if i in held_users}
        self.waiting_products = {p.product_id: p for i, p in enumerate(self.sim.products) if i in held_products}
        self.undelivered_users: set[str] = set(self.waiting_users)  # membership tests only, never iterated
        self.undelivered_products: set[str] = set(self.waiting_products)
        self.deleted_users: set[str] = set()
        self.user_plans: list[_Plan] = []
        self.product_plans: list[_Plan] = []
        self.fresh_users: list[tuple[str, dict[str, Any], bytes]] = []  # delivered: (id, row, its envelope)
        # (due, seq, topic, key, value, headers, (what, id) delivered)
        self.scheduled: list[tuple[datetime, int, str, bytes | None, bytes | None, list, tuple[str, str] | None]] = []
        self.seq = 0
        self.new_transactions: list[Transaction] = []
        self.transaction_rows: dict[str, dict[str, Any]] = {}
        self.last_rows: deque[dict[str, Any]] = deque(maxlen=32)  # recent transaction rows, templates of bad ones
        self.batch_good: list[_Item] = []  # good events of the current batch from snapshot users
        self.previous_good: list[_Item] = []
        self.accepted_sample: deque[_Item] = deque(maxlen=200)  # older good events, for copies past the window
        self.carried: list[_Item] = []  # follow-ups for the next batch (a replay sent again)
        self.replays = 0

    # -- positions and headers ----------------------------------------------------------------------------------
    def _record(
        self, topic: str, partitions: int, key: bytes | None, value: bytes | None, headers: list, when: datetime
    ) -> Record:
        partition = zlib.crc32(key) % partitions if key is not None else self.rng.randrange(partitions)
        return self._at(topic, partition, key, value, headers, when)

    def _at(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: list, when: datetime
    ) -> Record:
        offset = self.offsets[(topic, partition)]
        self.offsets[(topic, partition)] = offset + 1
        return Record(topic, partition, offset, key, value, headers, _ms(when))

    def _headers(self, case: str | None = None, *, traced: bool = True) -> list[tuple[str, bytes]]:
        rng = self.rng
        headers = []
        if traced:
            headers.append((TRACEPARENT, f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01".encode()))
        headers.append((PRODUCER, b"generator"))
        if case is not None:
            headers.append((CASE, case.encode()))
        return headers

    def _next_case(self, family: str, cases: Sequence[str]) -> str:
        number = self.case_no[family]
        self.case_no[family] = number + 1
        return cases[number % len(cases)]

    # -- the whole corpus ---------------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        yield from self._snapshot()
        while self.emitted < self.events:
            yield from self._event_batch()
            yield from self._cdc_batches()
        if self.scheduled:  # references still on their way: they arrive, late, after the last event
            self.cursor = max(self.cursor, max(entry[0] for entry in self.scheduled))
            yield from self._cdc_batches(plan=False)

    def _batch_size(self) -> int:
        return max(1, min(MAX_BATCH, int(math.exp(self.rng.uniform(0, math.log(MAX_BATCH))))))

    def _chunks(self, records: list[Record]) -> Iterator[list[Record]]:
        """`records` in batches of varying size (a topic's records, in order)."""
        start = 0
        while start < len(records):
            size = self._batch_size()
            yield records[start : start + size]
            start += size

    def _snapshot(self) -> Iterator[Batch]:
        stamp = _ms(START)
        for topic, table, rows in (
            (CDC_USERS, "users", [self._user_row(u) for u in self.stable_users]),
            (CDC_PRODUCTS, "products", [asdict(p) for p in self.stable_products]),
        ):
            key_name = "user_id" if table == "users" else "product_id"
            records = []
            for row in rows:
                self.lsn += 1
                key = _json({key_name: row[key_name]})
                value = _json(make_envelope("r", table, after=row, lsn=self.lsn, ts_ms=stamp))
                records.append(self._record(topic, REFERENCE_PARTITIONS, key, value, [], START))
            for chunk in self._chunks(records):
                yield Batch(self.at, chunk)

    @staticmethod
    def _user_row(user: Any) -> dict[str, Any]:
        return {k: v for k, v in asdict(user).items() if k != "shipping_address"}

    # -- events ---------------------------------------------------------------------------------------------------
    def _event_batch(self) -> Iterator[Batch]:
        rng = self.rng
        self.batch_no += 1
        if self.batch_no % GAP_EVERY == 0:
            self.cursor = _floor_ms(self.cursor + timedelta(seconds=rng.uniform(16 * 60, 40 * 60)))
        size = min(self._batch_size(), self.events - self.emitted)
        specials = 1 + size // SPECIAL_EVERY
        items = self.carried + self._boundary_copies()
        self.carried = []
        self.batch_good = []
        while len(items) + specials < size:
            self.cursor += timedelta(milliseconds=int(rng.expovariate(1 / MEAN_SPACING_MS)))
            items.append(self._next_event())
        at = _floor_ms(
            max(self.at + timedelta(milliseconds=1), self.cursor + timedelta(milliseconds=rng.randint(5, 800)))
        )
        for _ in range(specials):
            position = 0
            for item in self._event_case(self._next_case("event", EVENT_CASES), at):
                position = rng.randint(position, len(items))  # a case's records keep their order
                items.insert(position, item)
                position += 1
        self.previous_good = self.batch_good[-50:]
        self.emitted += len(items)
        self.at = at
        yield Batch(at, [self._record(EVENTS_RAW, EVENT_PARTITIONS, i.key, i.value, i.headers, i.when) for i in items])

    def _boundary_copies(self) -> list[_Item]:
        """Copies of events of the batch before, at the start of this one: exact, and with the id in upper case."""
        rng = self.rng
        copies = []
        if self.previous_good and rng.random() < 0.6:
            original = rng.choice(self.previous_good)
            copies.append(_Item(original.key, original.value, self._headers("dup_across_batches"), original.when))
        if self.previous_good and rng.random() < 0.4:
            original = rng.choice(self.previous_good)
            assert original.record is not None
            record = {**original.record, "event_id": original.record["event_id"].upper()}
            copies.append(
                _Item(original.key, self.serialize(record), self._headers("dup_case_across_batches"), original.when)
            )
        return copies

    def _next_event(self) -> _Item:
        now = self.cursor
        bad = self.bad.maybe(now)
        if bad is not None:
            if bad.payload is not None:
                value = bad.payload
            else:
                assert bad.record is not None
                value = (self.serialize_rogue if bad.writer_schema else self.serialize)(bad.record)
            return _Item(bad.key.encode() if bad.key else None, value, self._headers(bad.kind), now)
        event = self.sim.next_event(now)
        self._rewrite_fresh(event)
        self.bad.observe(event)
        if event.transaction is not None:
            self.new_transactions.append(event.transaction)
        case = self._reference_case(event)
        record = event.to_record()
        item = _Item(
            event.key.encode() if event.key else None, self.serialize(record), self._headers(case), now, record
        )
        if case is None:
            self.batch_good.append(item)
            if self.rng.random() < 0.01:
                self.accepted_sample.append(item)
        return item

    def _rewrite_fresh(self, event: Event) -> None:
        """Give some events to fresh (or deleted) users and products, whose rows come late or not at all."""
        rng = self.rng
        now = event.event_time
        if self.user_plans and self.user_plans[0].start <= now and rng.random() < 0.25:
            plan = self.user_plans[0]
            event.user_id = plan.id
            event.country = plan.country
            if event.transaction is not None:
                event.transaction.user_id = plan.id
            plan.remaining -= 1
            if plan.remaining <= 0:
                self.user_plans.pop(0)
        plans = self.product_plans
        if event.product_id is not None and plans and plans[0].start <= now and rng.random() < 0.3:
            plan = plans[0]
            event.product_id = plan.id
            event.page_url = f"/products/{plan.id}" if event.event_type == "product_view" else event.page_url
            if event.transaction is not None:
                event.transaction.product_id = plan.id
            plan.remaining -= 1
            if plan.remaining <= 0:
                plans.pop(0)
        # A held-back user or product is being used: its row is on its way, mostly within the retries.
        for waiting, table in ((self.waiting_users, "users"), (self.waiting_products, "products")):
            key = event.user_id if table == "users" else event.product_id
            if key in waiting:
                late = rng.uniform(0.2, 45) if rng.random() < 0.75 else rng.uniform(70, 300)
                reference = waiting.pop(key)
                row = self._user_row(reference) if table == "users" else asdict(reference)
                self._schedule_row(table, "c", row, now + timedelta(seconds=late), None)

    def _reference_case(self, event: Event) -> str | None:
        if event.user_id in self.deleted_users:
            return "deleted_user"
        if event.user_id in self.undelivered_users:
            return "late_user"
        if event.product_id in self.undelivered_products:
            return "late_product"
        return None

    # -- hostile events -------------------------------------------------------------------------------------------
    def _template(self, event_type: str = "product_view", *, when: datetime | None = None) -> dict[str, Any]:
        """A valid raw_event of a snapshot user and product (the cases change what they test)."""
        rng = self.rng
        user = rng.choice(self.stable_users)
        product = rng.choice(self.stable_products)
        price = float(product.price)
        with_product = event_type in ("product_view", "add_to_cart", "remove_from_cart", "purchase")
        purchase = event_type == "purchase"
        return {
            "event_id": uuid4_str(rng),
            "event_type": event_type,
            "event_time": _floor_ms(when or self.cursor),
            "user_id": user.user_id,
            "session_id": uuid4_str(rng),
            "product_id": product.product_id if with_product else None,
            "transaction_id": uuid4_str(rng) if purchase else None,
            "quantity": 1 if event_type in ("add_to_cart", "remove_from_cart", "purchase") else None,
            "price": price if with_product else None,
            "amount": price if purchase else None,
            "search_query": None,
            "page_url": f"/products/{product.product_id}" if with_product else "/",
            "referrer": None,
            "device_type": rng.choice(("desktop", "mobile", "tablet")),
            "ip_address": random_ipv4(rng),
            "country": user.country,
            "source": "generator",
            "properties": {},
        }

    def _item(
        self, case: str, record: dict[str, Any] | None, value: bytes | None = None, *, headers: list | None = None
    ) -> _Item:
        if value is None and record is not None:
            value = self.serialize(record)
        key = record["user_id"].encode("utf-8", "surrogatepass") if record and record.get("user_id") else b"hostile"
        when = record["event_time"] if record and isinstance(record.get("event_time"), datetime) else self.cursor
        return _Item(key, value, headers if headers is not None else self._headers(case), when, record)

    def _sized(self, size: int) -> bytes:
        """A valid raw_event payload of exactly `size` bytes (a properties value padded to fit)."""
        record = self._template()
        pad = max(0, size - len(self.serialize(record)))
        while True:
            record["properties"] = {"blob": "x" * pad}
            value = self.serialize(record)
            if len(value) == size:
                return value
            pad += size - len(value)

    def _event_case(self, case: str, at: datetime) -> list[_Item]:
        rng = self.rng
        number = self.case_no["event"]
        record = self._template("purchase" if rng.random() < 0.3 else rng.choice(("product_view", "add_to_cart")))
        if case == "invalid_utf8":
            marker = f"/marker/{rng.getrandbits(64):016x}"
            value = self.serialize({**record, "page_url": marker})
            at_marker = value.index(marker.encode())
            return [self._item(case, record, value[:at_marker] + b"\xff\xfe" + value[at_marker + 2 :])]
        if case == "oversized":
            return [self._item(case, record, self.serialize({**record, "properties": {"blob": "x" * 100_000}}))]
        if case == "oversized_1mb":
            size = WHOLE_AND_CUT_SIZES[number % len(WHOLE_AND_CUT_SIZES)]
            return [self._item(case, record, b"\xc3\x01" + rng.randbytes(size - 2))]
        if case == "at_size_limit":
            return [self._item(case, None, self._sized(MAX_EVENT_BYTES), headers=self._headers(case))]
        if case == "over_size_limit":
            return [self._item(case, None, self._sized(MAX_EVENT_BYTES + 1), headers=self._headers(case))]
        if case == "truncated":
            return [self._item(case, record, self.serialize(record)[:-7])]
        if case == "trailing_bytes":
            return [self._item(case, record, self.serialize(record) + b"\x00\x01")]
        if case == "empty_value":
            return [self._item(case, record, b"")]
        if case == "null_value":
            item = self._item(case, record)
            item.value = None
            return [item]
        if case == "unknown_fingerprint":
            body = self.serialize(record)[10:]
            fingerprint = rng.randbytes(8) if number % 2 else bytes(range(8))
            return [self._item(case, record, b"\xc3\x01" + fingerprint + body)]
        if case == "other_subject":
            change = {
                "transaction_id": uuid4_str(rng),
                "old_status": "created",
                "new_status": "paid",
                "changed_at": self.cursor,
                "source": "cdc",
                "source_lsn": 1,
            }
            return [self._item(case, record, self.serialize_foreign(change))]
        if case == "not_avro":
            shapes = (b"\x00garbage", _json({**record, "event_time": str(record["event_time"])}), b"\x7f" * 9, b"\xc3")
            return [self._item(case, record, shapes[number % len(shapes)])]
        if case == "header_only":
            return [self._item(case, record, self.serialize(record)[:10])]
        if case == "older_writer":
            older = {k: v for k, v in record.items() if k not in ("source", "properties")}
            return [self._item(case, record, self.serialize_older(older))]
        if case == "id_not_uuid":
            return [self._item(case, {**record, ID_FIELDS[number % len(ID_FIELDS)]: NOT_HEX})]
        if case == "id_control_character":
            name = ID_FIELDS[number % len(ID_FIELDS)]
            value = record[name] or uuid4_str(rng)
            character = CONTROL_CHARACTERS[number % len(CONTROL_CHARACTERS)]
            cut = rng.randrange(len(value))
            return [self._item(case, {**record, name: value[:cut] + character + value[cut + 1 :]})]
        if case == "id_upper_case":
            return [self._item(case, {k: v.upper() if k in ID_FIELDS and v else v for k, v in record.items()})]
        if case == "id_mutated":
            mutated = dict(record)
            for name in rng.sample([n for n in ID_FIELDS if record[n]], rng.randint(1, 2)):
                mutated[name] = mutate_id(rng, record[name])
            return [self._item(case, mutated)]
        if case == "event_id_empty":
            return [self._item(case, {**record, "event_id": ""})]
        if case == "event_type_unknown":
            return [self._item(case, {**record, "event_type": "teleport"})]
        if case == "event_type_null":
            return [self._item(case, {**record, "event_type": None})]
        if case == "amount_nan":
            return [self._item(case, {**self._template("purchase"), "amount": float("nan")})]
        if case == "price_infinite":
            return [self._item(case, {**self._template("add_to_cart"), "price": float("inf")})]
        if case == "quantity_out_of_range":
            return [self._item(case, {**self._template("purchase"), "quantity": (0, 1001, -2)[number % 3]})]
        if case == "price_negative":
            return [self._item(case, {**self._template("product_view"), "price": -0.01})]
        if case == "warn_flags":
            flagged = {**record, "device_type": "smart-fridge", "ip_address": "300.1.2.3", "country": "gb"}
            return [self._item(case, flagged)]
        if case == "purchase_without_transaction":
            return [self._item(case, {**self._template("purchase"), "transaction_id": None})]
        if case == "product_view_without_product":
            return [self._item(case, {**self._template("product_view"), "product_id": None})]
        if case == "email_in_properties":
            properties = {"contact_email": " Some.One@Example.COM ", "note": "gift"}
            return [self._item(case, {**record, "properties": properties})]
        if case == "future_at_limit":  # exactly `now + 5 minutes`: still accepted
            return [self._item(case, {**record, "event_time": at + timedelta(minutes=5)})]
        if case == "future_over_limit":
            return [self._item(case, {**record, "event_time": at + timedelta(minutes=5, milliseconds=1)})]
        if case == "before_epoch":
            return [self._item(case, {**record, "event_time": datetime(1969, 7, 20, 20, 17, tzinfo=UTC)})]
        if case == "old_then_copy":  # two hours old: remembered behind newer entries, past its window
            old = {**record, "event_time": _floor_ms(self.cursor - timedelta(hours=2))}
            return [self._item(case, old), self._item(case, old)]
        if case == "dup_in_batch":
            return [self._item(case, record), self._item(case, record)]
        if case == "dup_case_changed":
            crafted = {**record, "event_id": record["event_id"].upper(), "amount": 1.0, "quantity": 1, "price": 1.0}
            return [self._item(case, record), self._item(case, crafted)]
        if case == "dup_after_rejected":  # a refused copy does not block the good one; the good one blocks the next
            refused = {**record, "event_type": "teleport"}
            return [self._item(case, refused), self._item(case, record), self._item(case, record)]
        if case == "dup_of_retrying":  # the first copy waits for its user; the second is accepted meanwhile
            return [self._item(case, {**record, "user_id": uuid4_str(rng)}), self._item(case, record)]
        if case == "dup_old":  # a copy of an event from long ago (after a quiet gap: past the window)
            if self.accepted_sample:
                old = self.accepted_sample[rng.randrange(len(self.accepted_sample))]
                return [_Item(old.key, old.value, self._headers(case), old.when, old.record)]
            return [self._item(case, record)]
        if case == "replay":  # replayed from a dead-letter topic; the same source again next batch is dropped
            self.replays += 1
            source = f"events.raw.dlq:{self.replays % 3}:{self.replays}".encode()
            headers = [*self._headers(case), (REPLAY_ID, b"differential"), (REPLAY_SOURCE, source)]
            item = self._item(case, record, headers=headers)
            self.carried.append(_Item(item.key, item.value, list(headers), item.when, record))
            return [item]
        if case == "replay_of_accepted":
            self.replays += 1
            source = f"events.raw.dlq:0:{self.replays}".encode()
            headers = [*self._headers(case), (REPLAY_ID, b"differential"), (REPLAY_SOURCE, source)]
            if self.previous_good:
                original = rng.choice(self.previous_good)
                return [_Item(original.key, original.value, headers, original.when, original.record)]
            return [self._item(case, record, headers=headers)]
        if case == "forged_retry_headers":  # lp-retry-* on events.raw: the validator believes them
            unknown = {**record, "user_id": uuid4_str(rng)}
            first_seen = at - timedelta(seconds=(30, 290, 600)[number % 3])
            forged = [
                (RETRY_ATTEMPT, str(1 + number % 5).encode()),
                (RETRY_NOT_BEFORE, str(_ms(at)).encode()),
                (RETRY_FIRST_SEEN, str(_ms(first_seen)).encode()),
                (RETRY_RULE, b"user_exists"),
                (RETRY_ORIGINAL_TOPIC, EVENTS_RAW.encode()),
                (RETRY_ORIGINAL_PARTITION, b"0"),
                (RETRY_ORIGINAL_OFFSET, b"7"),
            ]
            return [self._item(case, unknown, headers=[*self._headers(case), *forged])]
        if case == "stale_dead_letter_headers":  # a dead letter sent back by hand, its old reason still on it
            stale = [(DLQ_ERROR_CODE, b"OUT_OF_RANGE"), (DLQ_ORIGINAL_TOPIC, b"events.raw"), (DLQ_MESSAGE, b"old")]
            return [self._item(case, record, headers=[*self._headers(case), *stale])]
        if case == "no_key_no_headers":
            item = self._item(case, record, headers=[(CASE, case.encode())])
            item.key = None
            return [item]
        raise ValueError(f"unknown event case {case!r}")

    # -- change data capture ----------------------------------------------------------------------------------------
    def _schedule(
        self,
        when: datetime,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list,
        delivered: tuple[str, str] | None = None,
    ) -> None:
        self.seq += 1
        heapq.heappush(self.scheduled, (when, self.seq, topic, key, value, headers, delivered))

    def _schedule_row(
        self, table: str, op: str, row: dict[str, Any], when: datetime, case: str | None, *, key_id: str | None = None
    ) -> bytes:
        """A users/products change at `when`; returns its envelope."""
        key_name = "user_id" if table == "users" else "product_id"
        self.lsn += 1
        after, before = (None, row) if op == "d" else (row, None)
        value = _json(make_envelope(op, table, before=before, after=after, lsn=self.lsn, ts_ms=_ms(when)))
        identity = key_id if key_id is not None else row[key_name]
        key = _json({key_name: identity})
        topic = CDC_USERS if table == "users" else CDC_PRODUCTS
        delivered = (table, row[key_name].lower()) if op != "d" else None
        self._schedule(when, topic, key, value, self._headers(case, traced=False) if case else [], delivered)
        return value

    def _plan_references(self) -> None:
        """New users and products (their first events before or after their row), deletes, updates, bad changes."""
        rng = self.rng
        now = self.cursor
        for _ in range(rng.choice((0, 1, 1, 2))):
            template = rng.choice(self.stable_users)
            user_id = uuid4_str(rng)
            row = {
                **self._user_row(template),
                "user_id": user_id,
                "email": f"new.{user_id[:8]}@example.com",
                "registration_date": now.date(),
                "created_at": now,
                "updated_at": now,
            }
            start = now + timedelta(seconds=rng.uniform(0, 30))
            self.user_plans.append(_Plan(user_id, start, rng.randint(1, 6), country=row["country"]))
            self.undelivered_users.add(user_id)
            upper = rng.random() < 0.2  # the row spells its id in upper case: stored canonical all the same
            if upper:
                row["user_id"] = user_id.upper()
            self._schedule_row("users", "c", row, start + self._arrival(), "ref_upper_case" if upper else None)
        if rng.random() < 0.4:
            template_product = rng.choice(self.stable_products)
            product_id = uuid4_str(rng)
            product_row = {**asdict(template_product), "product_id": product_id, "created_at": now, "updated_at": now}
            start = now + timedelta(seconds=rng.uniform(0, 30))
            self.product_plans.append(_Plan(product_id, start, rng.randint(1, 8)))
            self.undelivered_products.add(product_id)
            self._schedule_row("products", "c", product_row, start + self._arrival(), None)
        if self.fresh_users and rng.random() < 0.25:  # a user deleted; some of its events still come
            user_id, row, created = self.fresh_users.pop(rng.randrange(len(self.fresh_users)))
            self._schedule_row("users", "d", row, now, "ref_delete")
            self._schedule(now, CDC_USERS, _json({"user_id": user_id}), None, [], None)  # its tombstone
            self._schedule(
                now, CDC_USERS, _json({"user_id": user_id}), created, self._headers("ref_stale", traced=False)
            )
            self.deleted_users.add(user_id)
            self.user_plans.append(_Plan(user_id, now, 2, country=row["country"]))
            if rng.random() < 0.5:  # and comes back
                self._schedule_row("users", "c", row, now + timedelta(seconds=rng.uniform(1, 40)), "ref_recreated")
        if rng.random() < 0.3:  # a snapshot user changes tier (enrichment follows)
            user = rng.choice(self.stable_users)
            row = {
                **self._user_row(user),
                "tier": rng.choice(("bronze", "silver", "gold", "platinum")),
                "updated_at": now,
            }
            self._schedule_row("users", "u", row, now, None)
        if rng.random() < 0.2:
            product = rng.choice(self.stable_products)
            price = (product.price * Decimal(rng.choice(("0.9", "1.1")))).quantize(Decimal("0.01"))
            self._schedule_row("products", "u", {**asdict(product), "price": price, "updated_at": now}, now, None)
        if self.flush_no % 2 == 0:
            self._reference_special(self._next_case("reference", REFERENCE_CASES))

    def _arrival(self) -> timedelta:
        """When a new row arrives relative to its first event: before, within the retries, or after them."""
        rng = self.rng
        draw = rng.random()
        if draw < 0.35:
            return timedelta(seconds=-rng.uniform(0.5, 20))
        if draw < 0.8:
            return timedelta(seconds=rng.uniform(0.5, 45))
        return timedelta(seconds=rng.uniform(70, 300))

    def _reference_special(self, case: str) -> None:
        rng = self.rng
        now = self.cursor
        user = rng.choice(self.stable_users)
        product = rng.choice(self.stable_products)
        headers = self._headers(case, traced=False)
        user_key = _json({"user_id": user.user_id})

        def envelope(op: str, table: str, row: dict[str, Any], lsn: int | None = None) -> dict[str, Any]:
            if lsn is None:
                self.lsn += 1
                lsn = self.lsn
            return make_envelope(op, table, after=row, lsn=lsn, ts_ms=_ms(now))

        row = {**self._user_row(user), "updated_at": now}
        if case == "ref_not_json":
            self._schedule(now, CDC_USERS, user_key, b'{"op": "c", "after": {', headers)
        elif case == "ref_bad_uuid":
            self._schedule(
                now,
                CDC_USERS,
                _json({"user_id": NOT_HEX}),
                _json(envelope("c", "users", {**row, "user_id": NOT_HEX})),
                headers,
            )
        elif case == "ref_control_character":
            bad_id = product.product_id[:-1] + "\x00"
            product_row = {**asdict(product), "product_id": bad_id}
            self._schedule(now, CDC_PRODUCTS, None, _json(envelope("c", "products", product_row)), headers)
        elif case == "ref_bad_date":
            self._schedule(
                now,
                CDC_USERS,
                user_key,
                _json(envelope("u", "users", {**row, "registration_date": "someday"})),
                headers,
            )
        elif case == "ref_bad_price":
            product_row = {**asdict(product), "price": "cheap"}
            key = _json({"product_id": product.product_id})
            self._schedule(now, CDC_PRODUCTS, key, _json(envelope("u", "products", product_row)), headers)
        elif case == "ref_tombstone_unknown":
            self._schedule(now, CDC_USERS, _json({"user_id": uuid4_str(rng)}), None, headers)
        elif case == "ref_plain_key":
            self._schedule(now, CDC_USERS, user.user_id.encode(), _json(envelope("u", "users", row)), headers)
        elif case == "ref_bad_key":
            self._schedule(now, CDC_USERS, b"not-a-key", _json(envelope("u", "users", row)), headers)
        elif case == "ref_wrapped":
            wrapped = {"schema": {"type": "struct"}, "payload": envelope("u", "users", row)}
            self._schedule(now, CDC_USERS, user_key, _json(wrapped), headers)
        elif case == "ref_stale":  # an old change replayed: not newer than the row, ignored
            stale = {**row, "tier": "platinum", "city": "Stale City"}
            self._schedule(now, CDC_USERS, user_key, _json(envelope("u", "users", stale, lsn=1)), headers)
        elif case == "ref_bad_op":
            self._schedule(now, CDC_USERS, user_key, _json({**envelope("u", "users", row), "op": "z"}), headers)
        else:
            raise ValueError(f"unknown reference case {case!r}")

    def _transaction_changes(self) -> list[Record]:
        """The OLTP changes since the last flush: new purchases, status changes (some deleted at the end), bad ones."""
        rng = self.rng
        changes: list[tuple[datetime, str, dict[str, Any] | None, dict[str, Any] | None]] = []
        for transaction in self.new_transactions:
            row = asdict(transaction)
            self.transaction_rows[transaction.transaction_id] = row
            changes.append((transaction.created_at, "c", None, dict(row)))
        self.new_transactions = []
        for change in self.sim.due_status_changes(self.cursor):
            row = self.transaction_rows.get(change.transaction_id)
            if row is None:
                continue
            before = dict(row)
            row.update(status=change.new_status, updated_at=change.changed_at)
            changes.append((change.changed_at, "u", before, dict(row)))
            if change.new_status in ("delivered", "cancelled"):
                del self.transaction_rows[change.transaction_id]
                self.last_rows.append(dict(row))
                if rng.random() < 0.03:
                    changes.append((change.changed_at + timedelta(seconds=1), "d", dict(row), None))
        changes.sort(key=lambda change: change[0])  # stable: a row's changes stay in order
        records = []
        for when, op, before, after in changes:
            self.lsn += 1
            row = after if after is not None else before
            assert row is not None
            key = _json({"transaction_id": row["transaction_id"]})
            value = _json(make_envelope(op, "transactions", before=before, after=after, lsn=self.lsn, ts_ms=_ms(when)))
            records.append(self._record(CDC_TRANSACTIONS, TRANSACTION_PARTITIONS, key, value, [], when))
            if op == "d":  # its tombstone
                records.append(self._record(CDC_TRANSACTIONS, TRANSACTION_PARTITIONS, key, None, [], when))
        for _ in range(1 + len(changes) // 40):
            records += self._transaction_case(self._next_case("transaction", TRANSACTION_CASES))
        return records

    def _transaction_case(self, case: str) -> list[Record]:
        rng = self.rng
        now = self.cursor
        template = dict(self.last_rows[-1]) if self.last_rows else None
        if template is None:
            user, product = rng.choice(self.stable_users), rng.choice(self.stable_products)
            template = {
                "transaction_id": "",
                "user_id": user.user_id,
                "product_id": product.product_id,
                "quantity": 2,
                "unit_price": product.price,
                "discount": Decimal("0.00"),
                "tax": Decimal("0.00"),
                "total": product.price * 2,
                "payment_method": "paypal",
                "shipping_address": user.shipping_address,
                "status": "created",
                "created_at": now,
                "updated_at": now,
            }
        row = {**template, "transaction_id": uuid4_str(rng), "status": "created", "created_at": now, "updated_at": now}
        headers = self._headers(case, traced=False)
        self.lsn += 1
        lsn = self.lsn

        def change(op: str, *, before: dict | None = None, after: dict | None = None) -> dict[str, Any]:
            return make_envelope(op, "transactions", before=before, after=after, lsn=lsn, ts_ms=_ms(now))

        def record(value: bytes | None, key_id: str | None = None) -> Record:
            key = _json({"transaction_id": key_id if key_id is not None else row["transaction_id"]})
            return self._record(CDC_TRANSACTIONS, TRANSACTION_PARTITIONS, key, value, headers, now)

        if case == "tx_total_mismatch":
            return [record(_json(change("c", after={**row, "total": row["total"] + Decimal("7.00")})))]
        if case == "tx_bad_uuid":
            return [record(_json(change("c", after={**row, "user_id": NOT_HEX})))]
        if case == "tx_control_character":
            bad_id = row["transaction_id"][:-1] + "\x1b"
            return [record(_json(change("c", after={**row, "transaction_id": bad_id})), bad_id)]
        if case == "tx_upper_case":
            upper = row["transaction_id"].upper()
            return [record(_json(change("c", after={**row, "transaction_id": upper})), upper)]
        if case == "tx_negative_quantity":
            return [record(_json(change("c", after={**row, "quantity": -3})))]
        if case == "tx_unknown_status":
            return [record(_json(change("u", before=row, after={**row, "status": "refunded"})))]
        if case == "tx_discount_flag":  # a voucher worth more than the goods: kept, flagged
            voucher = {
                **row,
                "quantity": 1,
                "unit_price": Decimal("10.00"),
                "discount": Decimal("12.00"),
                "tax": Decimal("2.00"),
                "total": Decimal("0.00"),
            }
            return [record(_json(change("c", after=voucher)))]
        if case == "tx_negative_total":
            negative = {**row, "quantity": 1, "unit_price": Decimal("10.00"), "discount": Decimal("20.00")}
            return [record(_json(change("c", after={**negative, "tax": Decimal("0"), "total": Decimal("-10.00")})))]
        if case == "tx_missing_status":
            return [record(_json(change("c", after={**row, "status": None})))]
        if case == "tx_not_json":
            return [record(b"{not json")]
        if case == "tx_invalid_utf8":
            return [record(_json(change("c", after=row)).replace(b'"c"', b'"\xff\xfe"', 1))]
        if case == "tx_json_array":
            return [record(b"[1, 2, 3]")]
        if case == "tx_bad_op":
            return [record(_json({**change("c", after=row), "op": "x"}))]
        if case == "tx_update_without_after":
            return [record(_json(change("u", before=row)))]
        if case == "tx_delete_without_before":
            return [record(_json({**change("d", before=row), "before": None}))]
        if case == "tx_delete_bad_uuid":
            return [record(_json(change("d", before={**row, "transaction_id": NOT_HEX})), NOT_HEX)]
        if case == "tx_bad_decimal":
            return [record(_json(change("c", after={**row, "total": "abc"})))]
        if case == "tx_beyond_decimal":  # consistent, but more than decimal(12,2) holds
            huge = Decimal("100000000000.00")
            beyond = {**row, "quantity": 1, "unit_price": huge, "discount": Decimal("0"), "tax": Decimal("0")}
            return [record(_json(change("c", after={**beyond, "total": huge})))]
        if case == "tx_no_timestamps":
            envelope = change("c", after=row)
            del envelope["ts_ms"], envelope["source"]["ts_ms"]
            return [record(_json(envelope))]
        if case == "tx_snapshot":
            return [record(_json(change("r", after=row)))]
        if case == "tx_same_status":
            return [record(_json(change("u", before=row, after={**row, "payment_method": "gift_card"})))]
        if case == "tx_wrapped":
            return [record(_json({"schema": {"type": "struct"}, "payload": change("c", after=row)}))]
        if case == "tx_tombstone_only":
            return [record(None)]
        raise ValueError(f"unknown transaction case {case!r}")

    def _retry_case(self, case: str) -> Record:
        """A record on events.raw.retry that the validator did not write (forged, or from an older version)."""
        rng = self.rng
        now = self.at
        record = self._template("add_to_cart")
        unknown = {**record, "user_id": uuid4_str(rng)}
        retry_headers = {
            RETRY_ATTEMPT: b"2",
            RETRY_NOT_BEFORE: str(_ms(now - timedelta(seconds=1))).encode(),
            RETRY_FIRST_SEEN: str(_ms(now - timedelta(seconds=10))).encode(),
            RETRY_RULE: b"user_exists",
            RETRY_ORIGINAL_TOPIC: EVENTS_RAW.encode(),
            RETRY_ORIGINAL_PARTITION: str(rng.randrange(EVENT_PARTITIONS)).encode(),
            RETRY_ORIGINAL_OFFSET: str(rng.randrange(max(1, self.emitted))).encode(),
        }
        value: bytes | None = self.serialize(record)
        if case == "retry_garbage":
            value = b"junk"
        elif case == "retry_unreadable_headers":
            retry_headers[RETRY_ATTEMPT] = b"two"
        elif case == "retry_not_due":
            value = self.serialize(unknown)
            retry_headers[RETRY_NOT_BEFORE] = str(_ms(now + timedelta(seconds=20))).encode()
        elif case == "retry_last_attempt":
            value = self.serialize(unknown)
            retry_headers[RETRY_ATTEMPT] = b"5"
        elif case != "retry_found_now":
            raise ValueError(f"unknown retry case {case!r}")
        headers = [*self._headers(case), *retry_headers.items()]
        partition = RETRY_PARTITIONS + rng.randrange(2)
        return self._at(EVENTS_RAW_RETRY, partition, record["user_id"].encode(), value, headers, now)

    def _cdc_batches(self, *, plan: bool = True) -> Iterator[Batch]:
        self.flush_no += 1
        if plan:
            self._plan_references()
        by_topic: dict[str, list[Record]] = {CDC_USERS: [], CDC_PRODUCTS: [], CDC_TRANSACTIONS: []}
        while self.scheduled and self.scheduled[0][0] <= self.cursor:
            when, _, topic, key, value, headers, delivered = heapq.heappop(self.scheduled)
            by_topic[topic].append(self._record(topic, REFERENCE_PARTITIONS, key, value, headers, when))
            if delivered is not None:
                self._delivered(*delivered, value)
        by_topic[CDC_TRANSACTIONS] = self._transaction_changes()
        if plan and self.flush_no % 3 == 0:
            by_topic[EVENTS_RAW_RETRY] = [self._retry_case(self._next_case("retry", RETRY_CASES))]
        for records in by_topic.values():
            for chunk in self._chunks(records):
                self.at += timedelta(milliseconds=1)
                yield Batch(self.at, chunk)

    def _delivered(self, table: str, identity: str, envelope: bytes | None) -> None:
        if table == "users":
            was_late = identity in self.undelivered_users
            self.undelivered_users.discard(identity)
            self.deleted_users.discard(identity)
            if was_late and envelope is not None and identity not in self.waiting_users:
                row = json.loads(envelope)["after"]
                if row["email"].startswith("new."):  # a fresh user: it may be deleted later
                    self.fresh_users.append((identity, row, envelope))
        else:
            self.undelivered_products.discard(identity)


def differential_corpus(events: int, seed: int) -> Iterator[Batch]:
    """The validator's input, as batches in the order they are fed: about `events` records on events.raw (the
    batch that reaches it is completed) plus the CDC and retry-topic records around them. Same arguments, same
    batches, byte for byte."""
    return _Corpus(events, seed).batches()


# --- verdicts ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one input record. Positions of fed-back retries depend on earlier verdicts, so a retry is
    known by `retry_of` instead (`identity`)."""

    topic: str
    partition: int
    offset: int
    routes: tuple[str, ...]  # per output, in order: processed, status_history, retry, dead_letter; or ("none",)
    retry_of: str | None = None  # a fed-back retry: `<original topic>:<partition>:<offset>#<attempt>[+<n>]`
    case: str | None = None  # the corpus' name for the input (its lp-injected-fault header); None: a good one
    code: str | None = None  # dead letter: lp-dlq-error-code
    rule: str | None = None
    field: str | None = None
    message: str | None = None
    stage: str | None = None
    attempt: int | None = None  # lp-dlq-attempt
    origin: str | None = None  # lp-dlq-original-*, when not the input record's own position
    truncated_from: int | None = None  # lp-dlq-value-truncated-from
    flags: tuple[str, ...] | None = None  # processed: quality_flags
    retry_rule: str | None = None  # retry: lp-retry-rule
    retry_attempt: int | None = None
    not_before: int | None = None  # epoch ms
    value: str | None = None  # sha256 (16 hex) of the processed / status-history values
    output: str = ""  # sha256 (16 hex) of every output: topic, key, value, headers, in order

    @property
    def identity(self) -> str:
        return self.retry_of or f"{self.topic}:{self.partition}:{self.offset}"

    def to_json(self) -> str:
        data: dict[str, Any] = {}
        for name in _VERDICT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = list(value) if isinstance(value, tuple) else value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Verdict:
        data = json.loads(line)
        for name in ("routes", "flags"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


_VERDICT_FIELDS = tuple(f.name for f in fields(Verdict))
_NONE = -1


def _digest(parts: Iterable[bytes | str | None]) -> str:
    """A short sha256 of `parts`, each length-prefixed (None is not b"")."""
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            digest.update(_NONE.to_bytes(8, "big", signed=True))
            continue
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big", signed=True))
        digest.update(data)
    return digest.hexdigest()[:16]


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


PROCESSED_TOPICS = {EVENTS_PROCESSED: "processed_event", TRANSACTIONS_PROCESSED: "processed_transaction"}


def route_of(topic: str) -> str:
    if is_dead_letter_topic(topic):
        return "dead_letter"
    if topic in PROCESSED_TOPICS:
        return "processed"
    if topic == TRANSACTIONS_STATUS_HISTORY:
        return "status_history"
    if topic == EVENTS_RAW_RETRY:
        return "retry"
    return f"topic:{topic}"


class _Judge:
    """Turns a record's outputs into its `Verdict`."""

    def __init__(self) -> None:
        schemas = SchemaRepository.load()
        self.decoders = {topic: AvroDeserializer(schemas, subject) for topic, subject in PROCESSED_TOPICS.items()}

    def verdict(self, record: Record, outputs: Sequence[Output], retry_of: str | None) -> Verdict:
        case = _header(record.headers, CASE)
        found: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "routes": tuple(route_of(o.topic) for o in outputs) or ("none",),
            "retry_of": retry_of,
            "case": case.decode() if case else None,
        }
        if outputs:
            found["output"] = _digest(
                part
                for o in outputs
                for part in (o.topic, o.key, o.value, *(p for header in o.headers for p in header))
            )
        values = [o.value for o in outputs if o.topic in PROCESSED_TOPICS or o.topic == TRANSACTIONS_STATUS_HISTORY]
        if values:
            found["value"] = _digest(values)
        for out in outputs:
            if is_dead_letter_topic(out.topic):
                dead = parse_dead_letter(out.key, out.value, out.headers)
                origin = f"{dead.original_topic}:{dead.original_partition}:{dead.original_offset}"
                found.update(
                    code=dead.error_code,
                    rule=dead.rule,
                    field=dead.field,
                    message=dead.message,
                    stage=str(dead.stage),
                    attempt=dead.attempt,
                    origin=None if origin == f"{record.topic}:{record.partition}:{record.offset}" else origin,
                    truncated_from=dead.value_truncated_from,
                )
            elif out.topic in PROCESSED_TOPICS:
                decoded = self.decoders[out.topic](out.value)
                flags = decoded.record.get("quality_flags") if isinstance(decoded, Decoded) else ["<undecodable>"]
                found["flags"] = tuple(flags or ())
            elif out.topic == EVENTS_RAW_RETRY:
                state = parse_retry_headers(out.headers)
                if state is not None:
                    found.update(retry_rule=state.rule, retry_attempt=state.attempt, not_before=_ms(state.not_before))
        return Verdict(**found)


class _RetryTopic:
    """events.raw.retry as the runtime reads it: appended per partition (by key), each partition read in order
    and held at its first record not due yet."""

    EARLY_EVERY = 7  # every 7th hand-over also takes one record before it is due (the batch tools' path)

    def __init__(self, partitions: int) -> None:
        self.partitions: list[deque[tuple[int, Record]]] = [deque() for _ in range(partitions)]
        self.offsets = [0] * partitions
        self.handovers = 0
        self.seen: Counter[str] = Counter()  # identities fed back so far

    def append(self, output: Output, now: datetime) -> None:
        partition = zlib.crc32(output.key or b"") % len(self.partitions)
        state = parse_retry_headers(output.headers)
        due = _ms(state.not_before) if state is not None else _ms(now)
        headers = [(k, v if v is not None else b"") for k, v in output.headers]
        record = Record(
            EVENTS_RAW_RETRY, partition, self.offsets[partition], output.key, output.value, headers, _ms(now)
        )
        self.offsets[partition] += 1
        self.partitions[partition].append((due, record))

    def next_due(self) -> int | None:
        heads = [queue[0][0] for queue in self.partitions if queue]
        return min(heads) if heads else None

    def take_due(self, now_ms: int) -> list[Record]:
        self.handovers += 1
        early = self.handovers % self.EARLY_EVERY == 0
        taken = []
        for queue in self.partitions:
            while queue and queue[0][0] <= now_ms:
                taken.append(queue.popleft()[1])
            if early and queue:
                taken.append(queue.popleft()[1])
                early = False
        return taken

    def identity(self, record: Record) -> str:
        state = parse_retry_headers(record.headers)
        if state is None:
            return f"{record.topic}:{record.partition}:{record.offset}"
        base = f"{state.original_topic}:{state.original_partition}:{state.original_offset}#{state.attempt}"
        again = self.seen[base]
        self.seen[base] = again + 1
        return base if again == 0 else f"{base}+{again}"


def _feed(
    processor: BatchProcessor,
    records: list[Record],
    now: datetime,
    retries: _RetryTopic,
    judge: _Judge,
    *,
    fed_back: bool,
) -> Iterator[Verdict]:
    prepare = getattr(processor, "prepare", None)
    if prepare is not None:
        prepare(records)
    outputs = processor(records)
    by_source: dict[int, list[Output]] = {id(record): [] for record in records}
    for out in outputs:
        bucket = by_source.get(id(out.source))
        if bucket is None:
            raise ValueError(f"an output to {out.topic} names no record of its batch as its source")
        bucket.append(out)
    for record in records:
        produced = by_source[id(record)]
        for out in produced:
            if out.topic == EVENTS_RAW_RETRY:
                retries.append(out, now)
        yield judge.verdict(record, produced, retries.identity(record) if fed_back else None)


def run_verdicts(processor: BatchProcessor, corpus: Iterable[Batch], clock: FakeClock) -> Iterator[Verdict]:
    """Feed `corpus` to `processor` as the runtime would, and yield one verdict per input record (fed-back
    retries included), in the order they were processed. The clock only moves forward: to a batch's time, and
    between batches to each time a retry falls due."""
    processor.engine.clock = clock
    retries = _RetryTopic(RETRY_PARTITIONS)
    judge = _Judge()

    def due_retries(until: datetime | None) -> Iterator[Verdict]:
        while (due := retries.next_due()) is not None:
            if until is not None and due > _ms(until):
                return
            clock.now = max(clock.now, datetime.fromtimestamp(due / 1000, UTC))
            batch = retries.take_due(_ms(clock.now))
            yield from _feed(processor, batch, clock.now, retries, judge, fed_back=True)

    for batch in corpus:
        yield from due_retries(batch.at)
        clock.now = max(clock.now, batch.at)
        yield from _feed(processor, batch.records, clock.now, retries, judge, fed_back=False)
    yield from due_retries(None)


# --- recording and comparing ---------------------------------------------------------------------------------
class Recording:
    """A recording read back: its first line (how to regenerate the corpus), its verdicts (read as they are used),
    and, once they are read, its last line (`records` of the corpus, `rows`, and `corpus`: the corpus' digest)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            self.header: dict[str, Any] = json.loads(stream.readline())
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{path}: recording format {self.header.get('format')!r}, this code reads {FORMAT}")
        self.end: dict[str, Any] = {}

    @property
    def events(self) -> int:
        return int(self.header["events"])

    @property
    def seed(self) -> int:
        return int(self.header["seed"])

    def __iter__(self) -> Iterator[Verdict]:
        with gzip.open(self.path, "rt", encoding="utf-8") as stream:
            stream.readline()
            for line in stream:
                if line.startswith('{"end":'):
                    self.end = json.loads(line)["end"]
                    return
                yield Verdict.from_json(line)


class VerdictRun:
    """The verdicts of the corpus (`events`, `seed`) through `make_processor`'s processor, as an iterable; once
    iterated, `corpus` is the digest of every batch it was fed (which tells a changed corpus from changed
    verdicts)."""

    def __init__(
        self, events: int, seed: int, make_processor: Callable[[FakeClock], BatchProcessor] = differential_processor
    ) -> None:
        self.events, self.seed, self.make_processor = events, seed, make_processor
        self._digest = hashlib.sha256()
        self.records = 0  # of the corpus: each has one row; fed-back retries add theirs
        self.rows = 0

    @property
    def corpus(self) -> str:
        return self._digest.hexdigest()[:16]

    def _hashed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            self._digest.update(_digest([str(_ms(batch.at))]).encode())
            self.records += len(batch.records)
            for r in batch.records:
                parts = (r.topic, str(r.partition), str(r.offset), r.key, r.value, *(p for h in r.headers for p in h))
                self._digest.update(_digest(parts).encode())
            yield batch

    def __iter__(self) -> Iterator[Verdict]:
        clock = FakeClock()
        corpus = self._hashed(differential_corpus(self.events, self.seed))
        for verdict in run_verdicts(self.make_processor(clock), corpus, clock):
            self.rows += 1
            yield verdict


def rules_version() -> str:
    """The version of the rule files in force (part of every processed value, so of its digest)."""
    return RuleBook().current.version


def record(
    path: Path,
    events: int,
    seed: int,
    make_processor: Callable[[FakeClock], BatchProcessor] = differential_processor,
) -> Counter[tuple[str, str]]:
    """Write the verdicts of the corpus (`events`, `seed`) to `path` (gzip JSON lines, byte-identical for the same
    processor); returns the count of rows per (routes, dead-letter code)."""
    counts: Counter[tuple[str, str]] = Counter()
    run = VerdictRun(events, seed, make_processor)
    header = {"format": FORMAT, "events": events, "seed": seed, "rules_version": rules_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
        compressed.write((json.dumps(header) + "\n").encode())
        for verdict in run:
            counts[(",".join(verdict.routes), verdict.code or "")] += 1
            compressed.write((verdict.to_json() + "\n").encode())
        compressed.write(
            (json.dumps({"end": {"records": run.records, "rows": run.rows, "corpus": run.corpus}}) + "\n").encode()
        )
    return counts


@dataclass
class Comparison:
    compared: int = 0
    differences: int = 0
    missing: int = 0  # recorded, not produced by this run
    extra: int = 0  # produced by this run, not recorded
    by_field: Counter[str] = field(default_factory=Counter)  # differing rows per field
    first: list[tuple[Verdict | None, Verdict | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why everything may differ (a changed corpus or rule files)
    corpus_changed: bool = False

    @property
    def ok(self) -> bool:
        return not self.corpus_changed and self.differences == 0 and self.missing == 0 and self.extra == 0

    def report(self) -> str:
        lines = [
            f"{self.compared} records compared, {self.differences} differ, "
            f"{self.missing} recorded but not produced, {self.extra} produced but not recorded"
        ]
        lines += [f"NOTE: {note}" for note in self.notes]
        if self.by_field:
            lines.append("differing fields: " + ", ".join(f"{name} {n}" for name, n in self.by_field.most_common()))
        for expected, actual in self.first:
            row = expected or actual
            assert row is not None
            lines.append(f"- {row.identity} ({row.case or 'good'}):")
            if expected is None or actual is None:
                lines.append(f"    {'recorded' if actual is None else 'produced'} only: {row.to_json()}")
                continue
            for name in differing_fields(expected, actual):
                lines.append(f"    {name}: recorded {getattr(expected, name)!r}  now {getattr(actual, name)!r}")
        return "\n".join(lines)


def differing_fields(old: Verdict, new: Verdict) -> list[str]:
    """The fields in which two verdicts of one input differ. A fed-back retry's own position on events.raw.retry
    is where the driver appended it, which moves with any earlier difference: only its `retry_of` counts."""
    skip = ("partition", "offset") if old.retry_of is not None else ()
    return [name for name in _VERDICT_FIELDS if name not in skip and getattr(old, name) != getattr(new, name)]


def compare_rows(expected: Iterable[Verdict], actual: Iterable[Verdict], *, show: int = 10) -> Comparison:
    """Match rows by `identity` (a difference does not misalign the rest) and compare them field by field."""
    result = Comparison()
    pending_expected: dict[str, Verdict] = {}
    pending_actual: dict[str, Verdict] = {}

    def check(old: Verdict, new: Verdict) -> None:
        result.compared += 1
        if old == new:
            return
        differing = differing_fields(old, new)
        if not differing:
            return
        result.differences += 1
        result.by_field.update(differing)
        if len(result.first) < show:
            result.first.append((old, new))

    sentinel = object()
    old_rows, new_rows = iter(expected), iter(actual)
    while True:
        old, new = next(old_rows, sentinel), next(new_rows, sentinel)
        if old is sentinel and new is sentinel:
            break
        if isinstance(old, Verdict):
            match = pending_actual.pop(old.identity, None)
            if match is not None:
                check(old, match)
            else:
                pending_expected[old.identity] = old
        if isinstance(new, Verdict):
            match = pending_expected.pop(new.identity, None)
            if match is not None:
                check(match, new)
            else:
                pending_actual[new.identity] = new
    result.missing, result.extra = len(pending_expected), len(pending_actual)
    for old in list(pending_expected.values())[: max(0, show - len(result.first))]:
        result.first.append((old, None))
    for new in list(pending_actual.values())[: max(0, show - len(result.first))]:
        result.first.append((None, new))
    return result


def compare(
    path: Path,
    make_processor: Callable[[FakeClock], BatchProcessor] = differential_processor,
    *,
    show: int = 10,
) -> Comparison:
    """Run the recording's corpus through `make_processor`'s processor and compare with the recording."""
    recording = Recording(path)
    run = VerdictRun(recording.events, recording.seed, make_processor)
    result = compare_rows(recording, run, show=show)
    if recording.end.get("corpus") != run.corpus:
        result.corpus_changed = True
        result.notes.append(
            f"the corpus is not the recorded one (digest {recording.end.get('corpus')} recorded, {run.corpus} now): "
            "the generator model or this module changed, so the rows cannot be compared; record again with the "
            "engine of reference"
        )
    recorded_rules = recording.header.get("rules_version")
    if recorded_rules != rules_version():
        result.notes.append(
            f"the rule files changed since the recording (rules version {recorded_rules} -> {rules_version()}): "
            "every processed value, so every `value` and `output` digest of a processed record, differs"
        )
    return result


def summary(counts: Counter[tuple[str, str]]) -> str:
    return "\n".join(f"{n:>10}  {routes} {code}".rstrip() for (routes, code), n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.testing.verdicts", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recording = commands.add_parser("record", help="run the corpus through the processor and write its verdicts")
    recording.add_argument("--events", type=int, default=GOLDEN_EVENTS)
    recording.add_argument("--seed", type=int, default=GOLDEN_SEED)
    recording.add_argument("--out", type=Path, default=GOLDEN)
    comparing = commands.add_parser(
        "compare", help="run the recording's corpus again and compare (exit 1 if any differ)"
    )
    comparing.add_argument("file", type=Path, nargs="?", default=GOLDEN)
    comparing.add_argument("--show", type=int, default=10, help="differences to print side by side")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.command == "record":
        counts = record(args.out, args.events, args.seed)
        elapsed = time.perf_counter() - started
        size = args.out.stat().st_size
        print(f"{sum(counts.values())} verdicts of {args.events} events (seed {args.seed}) in {elapsed:.1f} s")
        print(f"{args.out}: {size:,} bytes\n{summary(counts)}")
        return 0
    comparison = compare(args.file, show=args.show)
    print(comparison.report())
    print(f"in {time.perf_counter() - started:.1f} s")
    return 0 if comparison.ok else 1


if __name__ == "__main__":
    sys.exit(main())
