import pytest
from pydantic import Field

from services.kit.config import ConfigError, ServiceSettings, load_settings


class DemoSettings(ServiceSettings):
    events: int = Field(100, ge=0)
    postgres_dsn: str


def test_reads_environment(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("POSTGRES_DSN", "postgresql://x@h/db")
    monkeypatch.setenv("EVENTS", "42")
    settings = load_settings(DemoSettings)
    assert settings.events == 42
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"


def test_missing_and_bad_values_name_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("POSTGRES_DSN", raising=False)
    monkeypatch.setenv("EVENTS", "-5")
    with pytest.raises(ConfigError) as caught:
        load_settings(DemoSettings)
    assert caught.value.code == 2
    message = str(caught.value)
    assert "KAFKA_BOOTSTRAP_SERVERS" in message
    assert "POSTGRES_DSN" in message
    assert "EVENTS" in message and "-5" in message
    assert "KAFKA_BOOTSTRAP_SERVERS" in capsys.readouterr().err


def test_secrets_are_not_echoed(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "h:1")
    monkeypatch.setenv("POSTGRES_DSN", "x")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("HTTP_PORT", "not-a-port")
    with pytest.raises(ConfigError) as caught:
        load_settings(DemoSettings)
    assert "HTTP_PORT" in str(caught.value)
