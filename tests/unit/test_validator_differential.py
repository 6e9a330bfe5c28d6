"""The validator gives the recorded verdict for every record of a generated corpus (issue 13's differential test).

tests/golden/validator_verdicts.jsonl.gz holds the verdicts of the engine of reference on the corpus of
`services.testing.verdicts` (20,000 events, seed 13): route(s), dead-letter code, rule, field, message, quality
flags, retry schedule and digests of everything produced, per input record. This runs the processor of
`differential_processor` over the same corpus and wants the same rows; the other tests check that the recording
covers what the corpus promises, so it cannot shrink unnoticed.

Recording again (only with the engine of reference, after a deliberate change of the corpus, the rules or the
output contracts): `.venv/bin/python -m services.testing.verdicts record`.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from services.generator.bad_events import BAD_KINDS
from services.testing.verdicts import (
    EVENT_CASES,
    GOLDEN,
    REFERENCE_CASES,
    RETRY_CASES,
    TRANSACTION_CASES,
    Recording,
    Verdict,
    compare,
)
from services.validator.retry import RetryPolicy

DUPLICATE = ("dead_letter", "DUPLICATE", "event_id_unique")
PROCESSED = ("processed", "", "")
RETRY = ("retry", "", "")
NONE = ("none", "", "")
TRANSACTION = ("processed,status_history", "", "")


def dead(code: str, rule: str = "") -> tuple[str, str, str]:
    return ("dead_letter", code, rule)


# What each case's records get on their first delivery: (routes, dead-letter code, rule), "" for none.
FIRST_OUTCOMES: dict[str, set[tuple[str, str, str]]] = {
    # the generator's injected faults (services.generator.bad_events)
    "null_ids": {dead("MISSING_FIELD", "event_required_ids")},
    "wrong_types": {dead("UNKNOWN_WRITER_SCHEMA")},
    "negative_amount": {dead("OUT_OF_RANGE", "amount_not_negative")},
    "unknown_user": {RETRY},
    "duplicate": {DUPLICATE, PROCESSED, RETRY},  # a copy of an event still waiting for its user is no duplicate
    "future_timestamp": {dead("FUTURE_TIMESTAMP", "event_time_not_in_future")},
    "garbage_bytes": {dead("NOT_AVRO_SINGLE_OBJECT")},
    # hostile payloads of the validator's tests
    "invalid_utf8": {dead("INVALID_UTF8")},
    "oversized": {dead("PAYLOAD_TOO_LARGE")},
    "oversized_1mb": {dead("PAYLOAD_TOO_LARGE")},
    "at_size_limit": {PROCESSED},
    "over_size_limit": {dead("PAYLOAD_TOO_LARGE")},
    "truncated": {dead("CORRUPT_OR_TRUNCATED")},
    "trailing_bytes": {dead("TRAILING_BYTES")},
    "empty_value": {dead("EMPTY_PAYLOAD")},
    "null_value": {dead("EMPTY_PAYLOAD")},
    "unknown_fingerprint": {dead("UNKNOWN_WRITER_SCHEMA")},
    "other_subject": {dead("INCOMPATIBLE_WRITER_SCHEMA")},
    "not_avro": {dead("NOT_AVRO_SINGLE_OBJECT")},
    "header_only": {dead("CORRUPT_OR_TRUNCATED")},
    "older_writer": {PROCESSED},
    "id_not_uuid": {dead("NOT_A_UUID", "event_ids_uuid")},
    "id_control_character": {dead("CONTROL_CHARACTER", "event_ids_uuid")},
    "id_upper_case": {PROCESSED},
    "id_mutated": {PROCESSED, dead("NOT_A_UUID", "event_ids_uuid"), dead("CONTROL_CHARACTER", "event_ids_uuid")},
    "event_id_empty": {dead("MISSING_FIELD", "event_required_ids")},
    "event_type_unknown": {dead("VALUE_NOT_ALLOWED", "event_type_known")},
    "event_type_null": {dead("MISSING_FIELD", "event_required_ids")},
    "amount_nan": {dead("OUT_OF_RANGE", "amount_not_negative")},
    "price_infinite": {PROCESSED},  # `min: 0` holds for +inf (NaN is refused)
    "quantity_out_of_range": {dead("OUT_OF_RANGE", "quantity_positive")},
    "price_negative": {dead("OUT_OF_RANGE", "price_not_negative")},
    "warn_flags": {PROCESSED},
    "purchase_without_transaction": {dead("MISSING_FIELD", "purchase_required_fields")},
    "product_view_without_product": {dead("MISSING_FIELD", "product_event_required_product")},
    "email_in_properties": {PROCESSED},
    "future_at_limit": {PROCESSED},
    "future_over_limit": {dead("FUTURE_TIMESTAMP", "event_time_not_in_future")},
    "before_epoch": {PROCESSED},
    "old_then_copy": {PROCESSED, DUPLICATE},
    "dup_in_batch": {PROCESSED, DUPLICATE},
    "dup_case_changed": {PROCESSED, DUPLICATE},
    "dup_after_rejected": {dead("VALUE_NOT_ALLOWED", "event_type_known"), PROCESSED, DUPLICATE},
    "dup_of_retrying": {RETRY, PROCESSED},
    "dup_old": {PROCESSED, DUPLICATE},  # both: whether the window still holds it
    "dup_across_batches": {DUPLICATE},
    "dup_case_across_batches": {DUPLICATE},
    "replay": {PROCESSED, NONE},  # the same replay source a second time is dropped
    "replay_of_accepted": {DUPLICATE},
    "forged_retry_headers": {dead("REFERENCE_NOT_FOUND", "user_exists")},  # the forged attempt / first seen count
    "stale_dead_letter_headers": {PROCESSED},
    "no_key_no_headers": {PROCESSED},
    # late and deleted references
    "late_user": {RETRY},
    "late_product": {RETRY},
    "deleted_user": {RETRY},
    # records on events.raw.retry the validator did not write
    "retry_garbage": {dead("NOT_AVRO_SINGLE_OBJECT")},
    "retry_unreadable_headers": {PROCESSED},  # no readable retry state: a first delivery
    "retry_not_due": {RETRY},  # produced again, unchanged
    "retry_last_attempt": {dead("REFERENCE_NOT_FOUND", "user_exists")},
    "retry_found_now": {PROCESSED},
    # CDC transactions
    "tx_total_mismatch": {dead("TOTAL_MISMATCH", "transaction_total_consistent")},
    "tx_bad_uuid": {dead("NOT_A_UUID", "transaction_ids_uuid")},
    "tx_control_character": {dead("CONTROL_CHARACTER", "transaction_ids_uuid")},
    "tx_upper_case": {TRANSACTION},
    "tx_negative_quantity": {dead("OUT_OF_RANGE", "transaction_quantity_positive")},
    "tx_unknown_status": {dead("VALUE_NOT_ALLOWED", "transaction_status_known")},
    "tx_discount_flag": {TRANSACTION},
    "tx_negative_total": {dead("OUT_OF_RANGE", "transaction_money_not_negative")},
    "tx_missing_status": {dead("MISSING_FIELD", "transaction_required_fields")},
    "tx_not_json": {dead("CDC_BAD_ENVELOPE")},
    "tx_invalid_utf8": {dead("CDC_BAD_ENVELOPE")},
    "tx_json_array": {dead("CDC_BAD_ENVELOPE")},
    "tx_bad_op": {dead("CDC_BAD_ENVELOPE")},
    "tx_update_without_after": {dead("CDC_BAD_ENVELOPE")},
    "tx_delete_without_before": {dead("CDC_BAD_ENVELOPE")},
    "tx_delete_bad_uuid": {dead("NOT_A_UUID", "transaction_ids_uuid")},
    "tx_bad_decimal": {dead("CDC_BAD_ENVELOPE")},
    "tx_beyond_decimal": {dead("OUTPUT_CONTRACT")},
    "tx_no_timestamps": {dead("OUTPUT_CONTRACT")},
    "tx_snapshot": {TRANSACTION},
    "tx_same_status": {PROCESSED},  # no status change: no status history
    "tx_wrapped": {TRANSACTION},
    "tx_tombstone_only": {NONE},
    # users / products changes
    "ref_not_json": {dead("CDC_BAD_ENVELOPE")},
    "ref_bad_uuid": {dead("NOT_A_UUID")},
    "ref_control_character": {dead("CONTROL_CHARACTER")},
    "ref_bad_date": {dead("CDC_BAD_ENVELOPE")},
    "ref_bad_price": {dead("CDC_BAD_ENVELOPE")},
    "ref_tombstone_unknown": {NONE},
    "ref_plain_key": {NONE},
    "ref_bad_key": {dead("NOT_A_UUID")},
    "ref_wrapped": {NONE},
    "ref_stale": {NONE},
    "ref_bad_op": {dead("CDC_BAD_ENVELOPE")},
    "ref_upper_case": {NONE},
    "ref_delete": {NONE},
    "ref_recreated": {NONE},
}


def outcome(row: Verdict) -> tuple[str, str, str]:
    return (",".join(row.routes), row.code or "", row.rule or "")


@pytest.fixture(scope="module")
def recording() -> tuple[Recording, list[Verdict]]:
    recording = Recording(GOLDEN)
    rows = list(recording)
    return recording, rows


@pytest.fixture(scope="module")
def rows(recording: tuple[Recording, list[Verdict]]) -> list[Verdict]:
    return recording[1]


def test_every_record_gets_the_recorded_verdict() -> None:
    comparison = compare(GOLDEN, show=10)
    assert comparison.ok, "\n" + comparison.report()
    assert comparison.compared > 25_000


def test_every_record_of_the_corpus_has_one_row(recording: tuple[Recording, list[Verdict]]) -> None:
    recorded, rows = recording
    first = [row for row in rows if row.retry_of is None]
    assert len(first) == recorded.end["records"] and len(rows) == recorded.end["rows"]
    assert len({row.identity for row in rows}) == len(rows)  # no record judged twice, no retry fed back twice
    assert sum(row.topic == "events.raw" for row in first) >= recorded.events


def test_every_case_is_in_the_recording_with_its_outcome(rows: list[Verdict]) -> None:
    seen: defaultdict[str, Counter[tuple[str, str, str]]] = defaultdict(Counter)
    for row in rows:
        if row.retry_of is None and row.case is not None:
            seen[row.case][outcome(row)] += 1
    promised = {*BAD_KINDS, *EVENT_CASES, *TRANSACTION_CASES, *REFERENCE_CASES, *RETRY_CASES}
    assert promised <= set(FIRST_OUTCOMES), sorted(promised - set(FIRST_OUTCOMES))
    assert set(seen) == set(FIRST_OUTCOMES), (
        sorted(set(FIRST_OUTCOMES) - set(seen)),
        sorted(set(seen) - set(FIRST_OUTCOMES)),
    )
    for case, expected in FIRST_OUTCOMES.items():
        assert set(seen[case]) <= expected, (case, seen[case])
        assert sum(seen[case].values()) >= 2, (case, seen[case])  # each case more than once
    for case in ("duplicate", "dup_in_batch", "dup_after_rejected", "dup_old", "replay"):
        assert len(seen[case]) >= 2, (case, seen[case])  # each of its outcomes is there, not only one
    assert seen["dup_across_batches"][DUPLICATE] >= 5 and seen["dup_case_across_batches"][DUPLICATE] >= 5


def test_retries_end_accepted_dead_lettered_and_as_duplicates(rows: list[Verdict]) -> None:
    fed_back: defaultdict[str, Counter[tuple[str, str, str]]] = defaultdict(Counter)
    for row in rows:
        if row.retry_of is not None:
            fed_back[row.case or "good"][outcome(row)] += 1
    # late references: accepted on a retry once their row came, dead-lettered when it came too late
    for case in ("late_user", "late_product", "deleted_user"):
        assert fed_back[case][PROCESSED] > 0 and fed_back[case][RETRY] > 0, (case, fed_back[case])
        assert any(code == "REFERENCE_NOT_FOUND" for _, code, _ in fed_back[case]), (case, fed_back[case])
    # users that never come: every retry made, then REFERENCE_NOT_FOUND
    assert set(fed_back["unknown_user"]) == {RETRY, dead("REFERENCE_NOT_FOUND", "user_exists")}
    attempts = {row.attempt for row in rows if row.case == "unknown_user" and row.code == "REFERENCE_NOT_FOUND"}
    assert attempts == {RetryPolicy().max_attempts}
    # the copy accepted while the first one waited makes the first one's retry a duplicate
    assert set(fed_back["dup_of_retrying"]) == {DUPLICATE}
    # a retry handed over before it is due is produced again unchanged, then judged when due
    assert (
        fed_back["retry_not_due"][RETRY] > 0 and fed_back["retry_not_due"][dead("REFERENCE_NOT_FOUND", "user_exists")]
    )
    early = [row for row in rows if row.retry_of is not None and "+" in row.retry_of]
    assert early, "no retry was handed over before it was due"


def test_processed_records_carry_their_flags_and_digests(rows: list[Verdict]) -> None:
    warned = [row.flags for row in rows if row.case == "warn_flags"]
    assert warned and all(flags == ("device_type_known", "ip_address_ipv4", "country_iso2") for flags in warned)
    discounted = [row.flags for row in rows if row.case == "tx_discount_flag"]
    assert discounted and all(flags == ("transaction_discount_within_subtotal",) for flags in discounted)
    processed = [row for row in rows if row.routes[0] == "processed"]
    assert all(row.value and row.output and row.flags is not None for row in processed)
    assert len({row.value for row in processed}) == len(processed)  # validated_at and ids differ: no two alike
    cut = [row.truncated_from for row in rows if row.case == "oversized_1mb" and row.truncated_from]
    assert cut and all(size > 1_046_000 for size in cut)  # too large for the broker: the dead letter's value is cut
