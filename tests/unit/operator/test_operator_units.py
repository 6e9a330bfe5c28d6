"""The operator's pure parts: configuration, ownership (oldest wins), the Ready condition, spec parsing."""

from __future__ import annotations

import pytest

from services.kit.config import ConfigError, settings_from
from services.operator.handlers import ready_condition
from services.operator.reconcile import Claimant, Outcome, Reason, parse_resource, winner
from services.operator.settings import OperatorConfig

BASE = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def test_config_defaults_and_backoff() -> None:
    config = settings_from(OperatorConfig, BASE | {"OPERATOR_NAMESPACES": "data, tools"})
    assert config.namespaces == ["data", "tools"] and config.operator_peering == "lambda-pipeline"
    assert [config.retry_delay(n) for n in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OPERATOR_NAMESPACES", "Data_1"), ("OPERATOR_DRIFT_INTERVAL_S", "0"), ("OPERATOR_PEERING", "no spaces")],
)
def test_a_bad_variable_is_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from(OperatorConfig, BASE | {variable: value})
    assert variable in str(error.value)


def test_the_oldest_claimant_wins_then_namespace_and_name() -> None:
    old = Claimant("2026-01-01T00:00:01Z", "b", "x", "1")
    young = Claimant("2026-01-01T00:00:02Z", "a", "a", "2")
    tie = Claimant("2026-01-01T00:00:01Z", "a", "z", "3")
    assert winner([young, old]) == old
    assert winner([young, old, tie]) == tie
    assert winner([]) is None


def test_ready_condition_keeps_its_transition_time_while_the_status_holds() -> None:
    first = ready_condition(Outcome(Reason.CREATED, "created"), None, 1)
    assert first["status"] == "True" and first["observedGeneration"] == 1
    same = ready_condition(Outcome(Reason.UPDATED, "updated"), {**first, "lastTransitionTime": "then"}, 2)
    assert same["lastTransitionTime"] == "then" and same["reason"] == "Updated"
    failed = ready_condition(Outcome(Reason.NOT_SUPPORTED, "no"), same, 3)
    assert failed["status"] == "False" and failed["lastTransitionTime"] != "then"
    assert ready_condition(Outcome(Reason.PAUSED, "paused"), None, None)["status"] == "Unknown"


def test_resources_are_parsed_by_the_declarations_library() -> None:
    body = {
        "apiVersion": "lambdapipeline.io/v1alpha1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t", "namespace": "data"},
        "spec": {"topicName": "t", "partitions": 0, "replicationFactor": 1, "deletionPolicy": "Sometimes"},
    }
    spec, problems = parse_resource(body)
    assert spec is None
    assert any("partitions" in p for p in problems) and any("deletionPolicy" in p for p in problems)
    body["spec"] |= {"partitions": 2, "deletionPolicy": "Delete"}
    spec, problems = parse_resource(body)
    assert problems == [] and spec is not None and spec.deletion_policy == "Delete"  # type: ignore[union-attr]
