"""A per-record peer of the validator: the same rules and enrichment as a quix-streams user would write them.

`make bench` runs it against the same pre-produced events.raw records and broker as the service, so the service's
rate can be read as a ratio to what the ordinary hand-written way of doing the same work achieves.

The peer (`main`, run as a script in its own virtualenv, see below) is a plain quix-streams `Application`:

- `cdc.postgres.users` / `.products` (Debezium JSON envelopes) -> `dict`s of the enrichment fields, e-mail
  hashed. They are read to their end before the app starts (a plain consumer, as the service's reference feed
  does, so no event meets an empty table) and followed by two dataframes while it runs.
- `events.raw` (Avro single-object encoding: `C3 01`, the 8-byte schema fingerprint, the body) -> one
  function per record (`EventValidator.judge`): decode with fastavro `schemaless_reader`, the rules of
  services/validator/rules/events.yaml as plain Python (mandatory fields, uuid format with lower-casing, enums,
  ranges, regexes, future timestamp, duplicate event_id within 15 minutes in a dict, user/product lookups),
  enrichment (user_*, product_*, event date/hour/day_of_week/is_weekend, e-mail hashing in properties).
- accepted -> the output topic, encoded by a quix `Serializer` (fastavro `schemaless_writer` behind the same
  10-byte header as `services.kit.avro.AvroSerializer`); rejected -> the dead-letter topic, original bytes, with
  a `reason` header (`<rule id>: <message>`). Routed by `to_topic` with a topic-selecting callable, quix's
  documented way to route by content (branching with two `filter`s would pickle-copy every value for the second
  branch: ~10 % of the peer's time in a profile).

Deliberately not in the peer (what a first hand-written version leaves out, none of it on this benchmark's path,
where every event is valid and every reference is known): no retry topic (an unknown user or product is
dead-lettered at once), no LSN guard on reference changes, no rebuild of the duplicate memory after a restart, no
writer schemas other than the current raw_event, no payload-size limit, no rule-file reloads or per-rule metrics.
Nothing is tuned either: quix-streams' defaults (at-least-once, commit every 5 s, librdkafka's producer
defaults) except a shorter consumer session, which only shortens the group join on the local broker.

Measured (`peer_rate`): events/s from the peer's first processed event to `Application.run()` returning after
the last one, so its final producer flush and commit are included (the service's figure counts records whose
outputs are acknowledged). Start-up, the reference load and the group join are excluded, as for the service.

Own virtualenv (`.venv/peer`, `make bench-peer`, pins in bench/peer-requirements.txt): quixstreams 3.28.1 requires
confluent-kafka < 2.13, pydantic < 2.14 and pydantic-settings < 2.16, and the platform pins 2.16.1, 2.14.3 and
2.16.3, so the two cannot share one environment; the peer runs as a quix user installs it. This module's top
level imports only the standard library and fastavro (pinned to the same version in both), so the project's
tests can check the peer's rules against the service's without quixstreams.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas" / "avro"
PEER_PYTHON = REPO / ".venv" / "peer" / "bin" / "python"
RULES_VERSION = "peer"
MAGIC = b"\xc3\x01"
DUPLICATE_WINDOW = timedelta(minutes=15)
CLOCK_SKEW = timedelta(minutes=5)
SWEEP_EVERY = 10_000  # accepted events between sweeps of expired event_ids from the duplicate dict

EVENT_TYPES = frozenset(
    {"page_view", "product_view", "search", "add_to_cart", "purchase", "remove_from_cart", "checkout_start", "login",
     "logout"}
)  # fmt: skip
PRODUCT_EVENTS = frozenset({"product_view", "add_to_cart", "remove_from_cart"})
DEVICE_TYPES = frozenset({"desktop", "mobile", "tablet"})
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
IPV4 = re.compile(r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")
COUNTRY = re.compile(r"[A-Z]{2}")
ID_FIELDS = ("event_id", "user_id", "session_id", "product_id", "transaction_id")
EPOCH_DATE = date(1970, 1, 1)
NO_PRODUCT = dict.fromkeys(
    ("product_name", "product_category", "product_subcategory", "product_brand", "product_price")
)

Verdict = dict[str, Any]  # {"record": processed event} or {"raw": original bytes, "reason": why}


def load_schema(name: str) -> Any:
    return fastavro.parse_schema(json.loads((SCHEMAS / f"{name}.avsc").read_text()))


def single_object_header(parsed_schema: Any) -> bytes:
    """`C3 01` and the CRC-64-AVRO fingerprint of the schema's canonical form, little endian (Avro spec)."""
    crc = int(fingerprint(to_parsing_canonical_form(parsed_schema), "CRC-64-AVRO"), 16)
    return MAGIC + struct.pack("<Q", crc)


PROCESSED_EVENT = load_schema("processed_event")
PROCESSED_HEADER = single_object_header(PROCESSED_EVENT)


def encode_processed(record: Mapping[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(PROCESSED_HEADER)
    fastavro.schemaless_writer(out, PROCESSED_EVENT, record)
    return out.getvalue()


def hash_email(address: str) -> str:
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


def is_email_key(name: str) -> bool:
    lowered = name.lower()
    return lowered in ("email", "e_mail", "e-mail", "email_address") or lowered.endswith(("_email", "-email"))


def missing(value: Any) -> bool:
    """None, an empty or blank string, or an empty collection (the MANDATORY rule)."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, bytes | list | dict) and not value)


class Rejected(Exception):
    """An error rule failed: the event goes to the dead-letter topic with this reason."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule


class EventValidator:
    """The validator's event rules and enrichment, one record at a time, state in plain dicts."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self.raw_event = load_schema("raw_event")
        self.raw_header = single_object_header(self.raw_event)
        self.users: dict[str, dict[str, Any]] = {}  # user_id -> the user_* fields
        self.products: dict[str, dict[str, Any]] = {}  # product_id -> the product_* fields
        self.seen: dict[str, datetime] = {}  # accepted event_id -> end of its duplicate window (event time)
        self.newest_event_time: datetime | None = None
        self.accepted_since_sweep = 0

    # -- reference data ------------------------------------------------------------------------------------------
    def apply_user_change(self, envelope: Mapping[str, Any] | None) -> None:
        row = self._changed_row(envelope)
        if row is None:
            return
        user_id = row["user_id"].lower()
        if envelope["op"] == "d":  # type: ignore[index]
            self.users.pop(user_id, None)
            return
        registration = row.get("registration_date")
        self.users[user_id] = {
            "user_tier": row.get("tier"),
            "user_country": row.get("country"),
            "user_city": row.get("city"),
            # Debezium writes a date as days since the epoch
            "user_registration_date": EPOCH_DATE + timedelta(days=registration) if registration is not None else None,
            "user_email_hash": hash_email(row["email"]) if row.get("email") else None,
        }

    def apply_product_change(self, envelope: Mapping[str, Any] | None) -> None:
        row = self._changed_row(envelope)
        if row is None:
            return
        product_id = row["product_id"].lower()
        if envelope["op"] == "d":  # type: ignore[index]
            self.products.pop(product_id, None)
            return
        price = row.get("price")
        self.products[product_id] = {
            "product_name": row.get("name"),
            "product_category": row.get("category"),
            "product_subcategory": row.get("subcategory"),
            "product_brand": row.get("brand"),
            "product_price": float(price) if price is not None else None,  # Debezium writes a numeric as text
        }

    @staticmethod
    def _changed_row(envelope: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        if envelope is None:  # the tombstone after a delete
            return None
        envelope = envelope.get("payload", envelope)
        return envelope["before"] if envelope["op"] == "d" else envelope["after"]

    # -- events ----------------------------------------------------------------------------------------------------
    def decode(self, raw: bytes) -> dict[str, Any]:
        if raw[:10] != self.raw_header:
            raise Rejected("decode", "not a raw_event in Avro single-object encoding")
        try:
            return fastavro.schemaless_reader(io.BytesIO(raw[10:]), self.raw_event, None)  # type: ignore[return-value]
        except Exception as error:  # fastavro raises several kinds on a truncated or garbled body
            raise Rejected("decode", f"unreadable body: {error}") from None

    def judge(self, raw: bytes) -> Verdict:
        """One events.raw value in: the processed event, or the original bytes and the reason to dead-letter."""
        now = self.clock()
        try:
            event = self.decode(raw)
            flags = self.check(event, now)
        except Rejected as rejected:
            return {"raw": raw, "reason": str(rejected), "rule": rejected.rule}
        self.remember(event["event_id"], event["event_time"], now)
        return {"record": self.enrich(event, flags, now)}

    def check(self, event: dict[str, Any], now: datetime) -> list[str]:
        """The rules in the validator's order (presence, values, business, duplicates, lookups); raises `Rejected`
        at the first failing error rule, returns the warn rules that failed. Lower-cases upper-case UUIDs."""
        for name in ("event_id", "event_type", "event_time", "user_id"):
            if missing(event.get(name)):
                raise Rejected("event_required_ids", f"{name} is missing or empty")
        event_type = event["event_type"]
        if event_type == "purchase":
            for name in ("transaction_id", "product_id", "quantity", "price", "amount"):
                if missing(event.get(name)):
                    raise Rejected("purchase_required_fields", f"{name} is missing or empty")
        if event_type in PRODUCT_EVENTS and missing(event.get("product_id")):
            raise Rejected("product_event_required_product", "product_id is missing or empty")

        for name in ID_FIELDS:
            value = event.get(name)
            if value is not None:
                if not isinstance(value, str) or UUID.fullmatch(value) is None:
                    raise Rejected("event_ids_uuid", f"{name}={value!r} is not a UUID")
                event[name] = value.lower()
        if event_type not in EVENT_TYPES:
            raise Rejected("event_type_known", f"event_type={event_type!r} is not a known event type")
        amount, price, quantity = event.get("amount"), event.get("price"), event.get("quantity")
        if amount is not None and not amount >= 0:
            raise Rejected("amount_not_negative", f"amount={amount} is negative")
        if price is not None and not price >= 0:
            raise Rejected("price_not_negative", f"price={price} is negative")
        if quantity is not None and not 0 < quantity <= 1000:
            raise Rejected("quantity_positive", f"quantity={quantity} is outside (0, 1000]")
        flags = []
        device_type, ip_address, country = event.get("device_type"), event.get("ip_address"), event.get("country")
        if device_type is not None and device_type not in DEVICE_TYPES:
            flags.append("device_type_known")
        if ip_address is not None and IPV4.fullmatch(ip_address) is None:
            flags.append("ip_address_ipv4")
        if country is not None and COUNTRY.fullmatch(country) is None:
            flags.append("country_iso2")

        event_time = event["event_time"]
        if event_time > now + CLOCK_SKEW:
            raise Rejected(
                "event_time_not_in_future", "event_time is in the future (more than 5 minutes of clock skew)"
            )
        window_end = self.seen.get(event["event_id"])
        if window_end is not None and event_time <= window_end:
            raise Rejected("event_id_unique", f"event_id={event['event_id']} already accepted within 15 minutes")
        if event["user_id"] not in self.users:
            raise Rejected("user_exists", f"user_id={event['user_id']} not found in users")
        product_id = event.get("product_id")
        if product_id is not None and product_id not in self.products:
            raise Rejected("product_exists", f"product_id={product_id} not found in products")
        return flags

    def remember(self, event_id: str, event_time: datetime, now: datetime) -> None:
        """An accepted event_id, for the duplicate rule (the first copy wins); expired ids are swept now and then."""
        self.seen.setdefault(event_id, event_time + DUPLICATE_WINDOW)
        newest = min(event_time, now)  # one event stamped far ahead must not expire everything else
        if self.newest_event_time is None or newest > self.newest_event_time:
            self.newest_event_time = newest
        self.accepted_since_sweep += 1
        if self.accepted_since_sweep >= SWEEP_EVERY:
            self.accepted_since_sweep = 0
            self.seen = {key: end for key, end in self.seen.items() if end >= self.newest_event_time}

    def enrich(self, event: dict[str, Any], flags: list[str], now: datetime) -> dict[str, Any]:
        """The processed_event record: the raw fields, user_*/product_* fields, UTC time fields, hashed e-mails."""
        record = dict(event)
        record.update(self.users[event["user_id"]])
        product_id = event.get("product_id")
        record.update(self.products[product_id] if product_id is not None else NO_PRODUCT)
        event_time = event["event_time"]  # fastavro gives an aware UTC datetime for timestamp-millis
        weekday = event_time.isoweekday()
        record["event_date"] = event_time.date()
        record["event_hour"] = event_time.hour
        record["day_of_week"] = weekday
        record["is_weekend"] = weekday >= 6
        properties = event.get("properties") or {}
        record["properties"] = {
            key: hash_email(value) if is_email_key(key) else value for key, value in properties.items()
        }
        record["quality_flags"] = flags
        record["validated_at"] = now
        record["rules_version"] = RULES_VERSION
        return record


# -- the quix-streams application (runs in the peer's virtualenv) -------------------------------------------------
def load_references(bootstrap: str, topics: list[str], validator: EventValidator) -> None:
    """Read the reference topics to their end before any event (the broker's end offsets are not reliable here,
    so the end is each partition's EOF)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-validator-peer-references",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, partition, OFFSET_BEGINNING)
            for topic in topics
            for partition in metadata.topics[topic].partitions
        ]
        consumer.assign(partitions)
        pending = {(p.topic, p.partition) for p in partitions}
        apply = {topics[0]: validator.apply_user_change, topics[1]: validator.apply_product_change}
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is None:
                    value = message.value()
                    apply[message.topic()](json.loads(value) if value is not None else None)
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((message.topic(), message.partition()))
        if pending:
            raise TimeoutError(f"reference partitions not read to their end: {sorted(pending)}")
    finally:
        consumer.close()


def main(argv: list[str]) -> None:
    """`python bench/validator_peer.py BOOTSTRAP EVENTS_TOPIC COUNT USERS_TOPIC PRODUCTS_TOPIC OUTPUT DEAD_LETTER
    STATE_DIR REPORT`: process COUNT events, stop, write the rate to REPORT (JSON)."""
    from quixstreams import Application
    from quixstreams.models.serializers import Serializer

    bootstrap, events_topic, count, users_topic, products_topic, output, dead_letter, state_dir, report = argv
    target = int(count)

    class ProcessedEventSerializer(Serializer):
        """An accepted verdict's processed_event as `services.kit.avro.AvroSerializer` writes it."""

        def __call__(self, verdict: Verdict, ctx: Any) -> bytes:
            return encode_processed(verdict["record"])

    class OriginalBytes(Serializer):
        """A rejected verdict's original value, unchanged."""

        def __call__(self, verdict: Verdict, ctx: Any) -> bytes:
            return verdict["raw"]

    validator = EventValidator()
    load_references(bootstrap, [users_topic, products_topic], validator)

    app = Application(
        broker_address=bootstrap,
        consumer_group=f"bench-validator-peer-{time.time_ns()}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        # The local broker holds a group join for half the session timeout (docs: LOCAL-STACK); start-up only.
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        loglevel="WARNING",
    )
    progress = {"events": 0, "accepted": 0, "first": 0.0, "reasons": {}}

    def count_and_judge(raw: bytes) -> Verdict:
        if not progress["first"]:
            progress["first"] = time.perf_counter()
        verdict = validator.judge(raw)
        progress["events"] += 1
        if "record" in verdict:
            progress["accepted"] += 1
        else:
            progress["reasons"][verdict["rule"]] = progress["reasons"].get(verdict["rule"], 0) + 1
        if progress["events"] == target:
            app.stop()  # the loop ends after this record; run() then flushes the producer and commits
        return verdict

    def add_reason(verdict: Verdict, key: Any, timestamp: int, headers: Any) -> Any:
        return [*(headers or ()), ("reason", verdict["reason"].encode())] if "reason" in verdict else headers

    users = app.dataframe(app.topic(users_topic, value_deserializer="json", key_deserializer="bytes"))
    users.update(validator.apply_user_change)
    products = app.dataframe(app.topic(products_topic, value_deserializer="json", key_deserializer="bytes"))
    products.update(validator.apply_product_change)

    processed = app.topic(output, value_serializer=ProcessedEventSerializer(), key_serializer="bytes")
    dead_letters = app.topic(dead_letter, value_serializer=OriginalBytes(), key_serializer="bytes")
    events = app.dataframe(app.topic(events_topic, value_deserializer="bytes", key_deserializer="bytes"))
    events = events.apply(count_and_judge).set_headers(add_reason)
    events.to_topic(lambda verdict, key, timestamp, headers: processed if "record" in verdict else dead_letters)

    app.run()
    elapsed = time.perf_counter() - progress["first"]
    Path(report).write_text(
        json.dumps(
            {
                "events": progress["events"],
                "accepted": progress["accepted"],
                "dead_lettered": progress["reasons"],
                "seconds": elapsed,
                "events_per_s": progress["events"] / elapsed,
            }
        )
    )


# -- the benchmark side (runs in the project's virtualenv) ---------------------------------------------------------
def peer_rate(bootstrap: str, events: int, work_dir: Path) -> float:
    """Events/s of the peer over the first `events` records of events.raw: a fresh process and consumer group, from
    its first processed event to `run()` returning after the last (final flush and commit included)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from services.contracts.topics import CDC_PRODUCTS, CDC_USERS, EVENTS_PROCESSED, EVENTS_RAW

    if not PEER_PYTHON.exists():
        raise RuntimeError(f"{PEER_PYTHON} is missing: `make bench-peer` creates the peer's virtualenv")
    stamp = time.time_ns()
    output, dead_letter = f"bench.validator.peer.{stamp}", f"bench.validator.peer.{stamp}.dlq"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # outputs partitioned like the service's events.processed
    partitions = len(admin.list_topics(EVENTS_PROCESSED, timeout=10).topics[EVENTS_PROCESSED].partitions)
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in (output, dead_letter)]).values():
        future.result(timeout=30)
    report = work_dir / f"validator-peer-{stamp}.json"
    log_path = work_dir / f"validator-peer-{stamp}.log"
    args = [bootstrap, EVENTS_RAW, str(events), CDC_USERS, CDC_PRODUCTS, output, dead_letter]
    with log_path.open("wb") as log:
        subprocess.run(
            [str(PEER_PYTHON), "-P", __file__, *args, str(work_dir / "peer-state"), str(report)],
            cwd=work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
    if not report.exists():
        raise RuntimeError(f"the quix-streams peer wrote no report: {log_path.read_text()[-3000:]}")
    result = json.loads(report.read_text())
    if result["events"] != events or result["dead_lettered"]:  # every bench event is valid with known references
        raise RuntimeError(f"the quix-streams peer did not accept all {events} events: {result}")
    return float(result["events_per_s"])


if __name__ == "__main__":
    main(sys.argv[1:])
