"""The validator's own variables: defaults as documented, bad values named at start."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.kit.config import ConfigError, load_settings
from services.validator.pipeline import DEFAULT_RETRY_POLICY
from services.validator.processor import INPUT_TOPICS, ValidatorSettings


@pytest.fixture(autouse=True)
def broker(monkeypatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def test_defaults_consume_every_validator_input_and_keep_the_default_retry_policy(monkeypatch) -> None:
    monkeypatch.delenv("INPUT_TOPICS", raising=False)
    settings = load_settings(ValidatorSettings)
    assert settings.input_topics == INPUT_TOPICS
    assert settings.retry_policy() == DEFAULT_RETRY_POLICY


def test_retry_variables_shape_the_policy(monkeypatch) -> None:
    monkeypatch.setenv("VALIDATOR_RETRY_BASE_DELAY_S", "0.5")
    monkeypatch.setenv("VALIDATOR_RETRY_MAX_ATTEMPTS", "3")
    policy = load_settings(ValidatorSettings).retry_policy()
    assert (policy.base_delay, policy.max_attempts) == (timedelta(seconds=0.5), 3)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VALIDATOR_RETRY_BASE_DELAY_S", "0"),
        ("VALIDATOR_RETRY_MAX_ATTEMPTS", "many"),
        ("VALIDATOR_MAX_EVENT_BYTES", "10"),
        ("VALIDATOR_RELOAD_INTERVAL_S", "-1"),
    ],
)
def test_a_bad_value_stops_the_service_naming_the_variable(monkeypatch, capsys, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError):
        load_settings(ValidatorSettings)
    assert variable in capsys.readouterr().err
