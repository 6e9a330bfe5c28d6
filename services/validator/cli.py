"""The validator's tools: `replay` dead letters, `load` batch files (configuration: KAFKA_BOOTSTRAP_SERVERS, ...).

    python -m services.validator replay [--dlq events.raw.dlq] [--rule R] [--code C] [--since T] [--until T]
                                        [--topic ORIGINAL_TOPIC] [--into TOPIC] [--dry-run]
    python -m services.validator load FILE... [--source batch-file] [--no-references]

`replay` reads a dead-letter topic from its beginning (`scan_topic`), keeps the dead letters matching every
filter, and produces each one's original key, value and headers back to its original topic and partition,
with two more headers: `lp-replay-id` (this run) and `lp-replay-source` (`<dlq>:<partition>:<offset>`). The
service processes one replay source once per process, and the DUPLICATE_ALLOW_ONE rule on event_id drops a
replayed event that was accepted meanwhile, so running the same replay twice does not double-process within
the dedupe window, and a dead letter that was replayed and failed again is replaced by its newer dead letter
(docs/validation.md). Dead letters of batch files (original "topic" `file:...`) and of
topics that do not exist are skipped and counted, unless `--into TOPIC` names where to send them (a batch
row that failed a rule is dead-lettered as raw_event Avro, so `--into events.raw` replays it; an unreadable
row's dead letter is its original text and would only fail to decode again).

`load` runs CSV / JSONL / Parquet files (services.validator.batch) through `EventProcessor.process_record`,
the path the service takes for events.raw, and produces the results to the same topics (key = user_id);
rows that cannot be read become dead letters on events.raw.dlq. Reference data (users, products) is read
first from the cdc.postgres.users/products topics, as the service builds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Message
from confluent_kafka.admin import AdminClient

from services.contracts.deadletter import DeadLetter, NotADeadLetter, OriginalMessage, parse_dead_letter
from services.contracts.headers import BATCH_ORIGIN, REPLAY_ID, REPLAY_PREFIX, REPLAY_SOURCE
from services.contracts.topics import EVENTS_RAW, dead_letter_topic
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.config import ServiceSettings, load_settings
from services.kit.exits import ExitCode
from services.kit.kafka import KafkaProducer, client_config, scan_topic, wait_for_broker
from services.validator.batch import BATCH_SOURCE, BatchError, BatchStats, RecordCoercer, read_file
from services.validator.processor import ValidatorSettings, make_processor
from services.validator.reference_feed import ReferenceFeedError

Headers = list[tuple[str, bytes]]


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _existing_topics(config: dict[str, Any]) -> set[str]:
    """All topics, from a metadata request naming none (Tansu creates any topic a request names)."""
    metadata = AdminClient(dict(config)).list_topics(timeout=10)
    return {name for name, entry in metadata.topics.items() if entry.error is None}


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, sort_keys=True, default=str))


# --- replay ----------------------------------------------------------------------------------------------------


def select_dead_letters(
    config: dict[str, Any], dlq: str, filters: dict[str, Any]
) -> tuple[list[tuple[int, int, DeadLetter]], int]:
    """(partition, offset, dead letter) of the records of `dlq` that match `filters`, and how many records of
    the topic were not dead letters at all. A dead letter that was replayed and dead-lettered again is left out:
    its newer dead letter (whose `lp-replay-source` names it) stands for it, so replaying twice never doubles."""
    selected: list[tuple[int, int, DeadLetter]] = []
    superseded: set[str] = set()  # dead letters that were replayed and failed again: only the newest counts
    unreadable = 0

    def on_message(message: Message) -> None:
        nonlocal unreadable
        try:
            dead = parse_dead_letter(message.key(), message.value(), message.headers())
        except NotADeadLetter:
            unreadable += 1
            return
        for name, value in dead.original_headers:
            if name == REPLAY_SOURCE:
                superseded.add(value.decode("utf-8", "replace"))
        if dead.matches(**filters):
            selected.append((message.partition(), message.offset(), dead))

    scan_topic(config, dlq, on_message=on_message)
    selected = [item for item in selected if f"{dlq}:{item[0]}:{item[1]}" not in superseded]
    selected.sort(key=lambda item: (item[0], item[1]))
    return selected, unreadable


def replay_headers(dead: DeadLetter, replay_id: str, source: str) -> Headers:
    """The dead letter's original headers (an earlier replay's `lp-replay-*` replaced) plus this replay's."""
    kept = [(k, v) for k, v in dead.original_headers if not k.startswith(REPLAY_PREFIX)]
    return [*kept, (REPLAY_ID, replay_id.encode()), (REPLAY_SOURCE, source.encode())]


def replay(args: argparse.Namespace, settings: ServiceSettings) -> int:
    config = client_config(settings, client_id="lp-validator-replay")
    wait_for_broker(config, settings.dependency_wait_s)
    existing = _existing_topics(config)
    if args.dlq not in existing:
        print(f"dead-letter topic {args.dlq!r} does not exist", file=sys.stderr)
        return ExitCode.FAILED
    filters = {
        "rule": args.rule,
        "code": args.code,
        "topic": args.topic,
        "since": _time(args.since) if args.since else None,
        "until": _time(args.until) if args.until else None,
    }
    selected, unreadable = select_dead_letters(config, args.dlq, filters)
    replay_id = args.replay_id or uuid.uuid4().hex
    by_target: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    producer = None if args.dry_run else KafkaProducer(config)
    if args.into is not None and args.into not in existing:
        print(f"target topic {args.into!r} does not exist", file=sys.stderr)
        return ExitCode.FAILED
    for partition, offset, dead in selected:
        target = args.into or dead.original_topic
        if target not in existing:
            skipped[target] += 1
            continue
        by_target[f"{target}|{dead.error_code}|{dead.rule or ''}"] += 1
        if producer is not None:
            headers = replay_headers(dead, replay_id, f"{args.dlq}:{partition}:{offset}")
            same = target == dead.original_topic and dead.original_partition >= 0
            producer.produce(target, dead.value, dead.key, headers, partition=dead.original_partition if same else None)
    if producer is not None:
        producer.flush()
    _print(
        {
            "command": "replay",
            "dry_run": args.dry_run,
            "replay_id": replay_id,
            "dead_letter_topic": args.dlq,
            "matched": len(selected),
            "replayed" if not args.dry_run else "would_replay": sum(by_target.values()),
            "by_topic_code_rule": dict(by_target),
            "skipped_no_such_topic": dict(skipped),
            "not_dead_letters": unreadable,
        }
    )
    return ExitCode.OK


# --- load ------------------------------------------------------------------------------------------------------


LOAD_BATCH_ROWS = 2000  # rows judged together, as the stream's batches


def load(args: argparse.Namespace, settings: ValidatorSettings) -> int:
    config = client_config(settings, client_id="lp-validator-load")
    wait_for_broker(config, settings.dependency_wait_s)
    existing = _existing_topics(config)
    try:  # users/products read to their end first, as the service does; their dead letters are the service's job
        processor = make_processor(settings, follow_references=not args.no_references)
    except ReferenceFeedError as error:
        print(f"cannot read reference data: {error}", file=sys.stderr)
        return ExitCode.FAILED
    if processor.feed is not None:
        processor.feed.stop()
    events = processor.events
    needed = [
        events.topics.events_processed,
        events.topics.events_retry,
        events.topics.events_dead_letter,
    ]
    missing = [t for t in needed if t not in existing]
    if missing:
        print(f"topics missing: {', '.join(missing)} (python -m services.declarations apply)", file=sys.stderr)
        return ExitCode.FAILED
    raw = AvroSerializer(SchemaRepository.load()["raw_event"])
    coercer = RecordCoercer.for_raw_event(source=args.source)
    producer = KafkaProducer(config)
    routes: Counter[str] = Counter()
    stats = BatchStats()
    dead_topic = events.topics.events_dead_letter
    records: list[dict[str, Any]] = []
    messages: list[OriginalMessage] = []

    def judge() -> None:  # one batch of rows through the stream's engine, outputs in row order
        for out in events.process_records(records, messages):
            producer.produce(out.topic, out.value, out.key, out.headers)
            routes[out.route.value] += 1
        records.clear()
        messages.clear()
        producer.poll(0)

    for path in args.files:
        for item in read_file(Path(path), coercer=coercer, stats=stats):
            if isinstance(item, BatchError):
                dead = item.to_dead_letter(events.engine.clock(), topic=dead_topic)
                producer.produce(dead.topic, dead.value, dead.key, dead.headers)
                routes["dead_letter"] += 1
                continue
            user = item.record.get("user_id")
            key = str(user).encode() if user is not None else None
            try:
                value: bytes | None = raw(item.record)  # what a retry or dead letter carries: the raw event
            except (ValueError, TypeError, OverflowError):
                value = json.dumps(item.record, default=str).encode()
            headers: Headers = [(BATCH_ORIGIN, f"{item.origin}:{item.position}".encode())]
            records.append(item.record)
            messages.append(OriginalMessage(item.origin, -1, item.position, key, value, headers))
            if len(records) >= LOAD_BATCH_ROWS:
                judge()
        judge()
    producer.flush()
    _print(
        {
            "command": "load",
            "files": [str(p) for p in args.files],
            "rows": stats.rows,
            "row_errors": stats.errors,
            "unknown_columns": dict(stats.unknown_columns),
            "reference_changes_read": processor.feed.applied if processor.feed is not None else 0,
            "routes": dict(routes),
        }
    )
    return ExitCode.OK


# --- entry -----------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m services.validator", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("replay", help="re-inject dead letters into their original topic")
    default_dlq = dead_letter_topic(EVENTS_RAW)
    rep.add_argument("--dlq", default=default_dlq, help=f"dead-letter topic to read (default {default_dlq})")
    rep.add_argument("--rule", help="only dead letters of this rule id")
    rep.add_argument("--code", help="only this error code (lp-dlq-error-code)")
    rep.add_argument("--topic", help="only dead letters whose original topic is this")
    rep.add_argument("--since", help="only dead-lettered at or after this ISO 8601 time")
    rep.add_argument("--until", help="only dead-lettered before this ISO 8601 time")
    rep.add_argument(
        "--into", help="produce to this topic instead of the original one (batch-file dead letters: events.raw)"
    )
    rep.add_argument("--replay-id", help="value of the lp-replay-id header (default: a new uuid)")
    rep.add_argument("--dry-run", action="store_true", help="print what would be replayed; produce nothing")
    lod = commands.add_parser("load", help="run batch files through the validator into the output topics")
    lod.add_argument("files", nargs="+", help="CSV, JSONL or Parquet files (by extension)")
    lod.add_argument("--source", default=BATCH_SOURCE, help="value of every record's `source` (default batch-file)")
    lod.add_argument("--no-references", action="store_true", help="do not read users/products from CDC topics")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "replay":
        return replay(args, load_settings(ServiceSettings))
    return load(args, load_settings(ValidatorSettings))


if __name__ == "__main__":
    sys.exit(main())
