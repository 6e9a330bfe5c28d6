"""Every topic name in `services.contracts.topics` is declared as a KafkaTopic under deploy/k8s, and every
declared topic is one of them or a dead-letter topic the helpers derive from one."""

from __future__ import annotations

import pytest

from services.contracts import topics
from services.declarations.resources import load_declarations
from services.kit.paths import repo_root

TOPIC_CONSTANTS = {
    name: value
    for name, value in vars(topics).items()
    if name.isupper() and isinstance(value, str) and not name.endswith(("_SUFFIX", "_PREFIX"))
}


@pytest.fixture(scope="module")
def declared() -> set[str]:
    return {spec.topic_name for spec in load_declarations(repo_root() / "deploy" / "k8s").topics}


def test_every_topic_constant_is_declared(declared: set[str]) -> None:
    assert TOPIC_CONSTANTS, "no topic constants found"
    missing = {name: value for name, value in TOPIC_CONSTANTS.items() if value not in declared}
    assert not missing, f"not declared under deploy/k8s/topics: {missing}"
    for group in (topics.CDC_TOPICS, topics.REFERENCE_TOPICS):
        assert set(group) <= declared


def test_every_declared_dead_letter_topic_is_one_the_helpers_name(declared: set[str]) -> None:
    named = set(TOPIC_CONSTANTS.values())
    dead_letter_topics = {t for t in declared if topics.is_dead_letter_topic(t)}
    assert dead_letter_topics, "deploy/k8s/topics declares no dead-letter topic"
    for dead in dead_letter_topics:
        base = dead.removesuffix(topics.DLQ_SUFFIX)
        if base in named:  # <topic>.dlq
            assert topics.dead_letter_topic(base) == dead
            continue
        source, _, consumer = base.rpartition(".")  # <topic>.<consumer>.dlq (a sink's own dead letters)
        assert source in named and consumer.isidentifier(), f"{dead} is not <topic>[.<consumer>].dlq of a known topic"
        assert topics.dead_letter_topic(source, consumer) == dead


def test_every_declared_topic_is_named_in_the_contracts(declared: set[str]) -> None:
    unnamed = {t for t in declared if t not in TOPIC_CONSTANTS.values() and not topics.is_dead_letter_topic(t)}
    assert not unnamed, f"declared but without a constant in services.contracts.topics: {unnamed}"


def test_derived_names() -> None:
    assert topics.retry_topic(topics.EVENTS_RAW) == topics.EVENTS_RAW_RETRY == "events.raw.retry"
    assert topics.dead_letter_topic(topics.EVENTS_RAW_RETRY) == "events.raw.retry.dlq"
    assert topics.dead_letter_topic(topics.EVENTS_PROCESSED, "clickhouse") == "events.processed.clickhouse.dlq"
    assert topics.cdc_topic("users") == topics.CDC_USERS == "cdc.postgres.users"
    assert not topics.is_dead_letter_topic(topics.EVENTS_RAW)
