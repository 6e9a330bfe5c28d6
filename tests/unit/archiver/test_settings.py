"""Configuration from the environment: defaults, catalog choice, clear errors."""

from __future__ import annotations

import pytest

from services.archiver.__main__ import main
from services.archiver.settings import ArchiverSettings
from services.kit.config import ConfigError, load_settings


def test_unknown_tables_and_bad_numbers_are_refused(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "x:1")
    monkeypatch.setenv("ARCHIVER_TABLES", "user_events,orders")
    with pytest.raises(ConfigError):
        load_settings(ArchiverSettings)
    assert "ARCHIVER_TABLES: unknown table(s) ['orders']" in capsys.readouterr().err
    monkeypatch.setenv("ARCHIVER_TABLES", "user_events")
    monkeypatch.setenv("ARCHIVER_COMMIT_ROWS", "0")
    with pytest.raises(ConfigError):
        load_settings(ArchiverSettings)
    assert "ARCHIVER_COMMIT_ROWS" in capsys.readouterr().err


def test_topics_per_table(monkeypatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "x:1")
    monkeypatch.setenv("ARCHIVER_DEAD_LETTER_TOPICS", "a.dlq, b.dlq")
    settings = ArchiverSettings()
    assert settings.topics_of("dead_letters") == ("a.dlq", "b.dlq")
    assert settings.topics_of("user_events") == ("events.processed",)
    assert settings.consumer_group == "lp-archiver"


def test_the_cli_refuses_a_bad_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["vacuum"])
    assert exit_info.value.code == 2


def test_stats_and_history_through_the_cli(monkeypatch, tmp_path, capsys) -> None:
    import json

    monkeypatch.setenv("ICEBERG_SQL_URI", f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setenv("ICEBERG_WAREHOUSE", f"file://{tmp_path}/w")
    assert main(["init"]) == 0
    capsys.readouterr()
    assert main(["stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {name: (s["rows"], s["files"], s["snapshots"]) for name, s in stats.items()} == {
        "user_events": (0, 0, 0),
        "transactions": (0, 0, 0),
        "dead_letters": (0, 0, 0),
    }
    assert main(["history", "user_events"]) == 0
    assert main(["read", "transactions", "--count"]) == 0
    assert json.loads(capsys.readouterr().out) == {"table": "transactions", "rows": 0}
    assert main(["evolve", "--check"]) == 0
