"""The runtime's per-batch metrics: dead letters by code and rule read from the dead letters' own headers, and
verdicts / data quality / stage counters from per-topic counts."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from services.contracts.deadletter import OriginalMessage, Stage, build_dead_letter
from services.kit.metrics import WindowedShare
from services.validator import stream_app
from services.validator.runtime import Output

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def dead_letter(code: str, rule: str | None) -> Output:
    original = OriginalMessage(
        "m.raw", 0, 7, b"k", b"v", [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
    )
    letter = build_dead_letter(original, code=code, stage=Stage.VALIDATE, message="no", now=NOW, rule=rule)
    return Output(letter.topic, letter.key, letter.value, letter.headers)


def test_dead_letters_are_counted_by_topic_code_and_rule_from_their_headers():
    outputs = [
        Output("m.processed", b"k", b"v"),
        dead_letter("RULE_FAILED", "amount_positive"),
        dead_letter("RULE_FAILED", "amount_positive"),
        dead_letter("DECODE", None),
        Output("m.processed", b"k", b"v"),
    ]
    assert stream_app._dead_letter_reasons(outputs, {"m.raw.dlq"}) == {
        ("m.raw.dlq", "RULE_FAILED", "amount_positive"): 2,
        ("m.raw.dlq", "DECODE", ""): 1,
    }
    assert stream_app._dead_letter_reasons(outputs, set()) == {}


def test_verdicts_quality_and_stage_counters_come_from_per_topic_counts():
    class Runner:
        quality = WindowedShare(300)

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "accepted": value("lp_validator_verdicts_total", verdict="accepted"),
        "rejected": value("lp_validator_verdicts_total", verdict="rejected"),
        "in": value("lp_stage_records_in_total", stage="validator"),
        "out": value("lp_stage_records_out_total", stage="validator"),
        "reason": value("lp_dead_letters_total", topic="m.raw.dlq", code="RULE_FAILED", rule="r"),
    }
    flight = stream_app._Flight(
        acks=[],
        ack_counts=[],
        offsets={},
        records={"m.raw": 90, "m.raw.retry": 10},
        outputs={"m.processed": 80, "m.raw.dlq": 8, "m.raw.retry": 5, "m.status_history": 3},
        started=0.0,
        span=None,  # type: ignore[arg-type]
        dead_letter_reasons={("m.raw.dlq", "RULE_FAILED", "r"): 8},
    )
    runner = Runner()
    assert math.isnan(runner.quality.share())
    stream_app.BatchRunner._account_verdicts(runner, flight)  # type: ignore[arg-type]
    # 100 in, 5 deferred to the retry topic: 95 decided, 8 of them rejected
    assert value("lp_validator_verdicts_total", verdict="accepted") - before["accepted"] == 87
    assert value("lp_validator_verdicts_total", verdict="rejected") - before["rejected"] == 8
    assert runner.quality.share() == 87 / 95
    assert value("lp_stage_records_in_total", stage="validator") - before["in"] == 100
    assert value("lp_stage_records_out_total", stage="validator") - before["out"] == 83
    assert value("lp_dead_letters_total", topic="m.raw.dlq", code="RULE_FAILED", rule="r") - before["reason"] == 8
