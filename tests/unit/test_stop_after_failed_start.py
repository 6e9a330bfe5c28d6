"""`stop()` runs in the frame's `finally`, also after a `start()` that failed before setting anything up: every
service's stop must then close only what exists, and raise nothing (the start's error is the one to report)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.config import settings_from
from services.kit.exits import ExitCode


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "POSTGRES_DSN": "postgresql://lp@127.0.0.1:9/shop",
        "HTTP_PORT": "0",
        "CLICKHOUSE_CHDB_PATH": str(tmp_path / "chdb"),
        "ICEBERG_SQL_URI": f"sqlite:///{tmp_path}/catalog.db",
        "SNOWFLAKE_ACCOUNT": "lp",
        "SNOWFLAKE_USER": "lp",
        "SNOWFLAKE_PASSWORD": "x",
        "SNOWFLAKE_DATABASE": "LP",
        "REPORT_FILE": str(tmp_path / "report.json"),
    }


def _services():
    from services.archiver.app import ArchiverService
    from services.archiver.settings import ArchiverSettings
    from services.clickhouse_sink.app import ClickHouseSinkService
    from services.clickhouse_sink.settings import ClickHouseSinkSettings
    from services.generator.app import Generator, GeneratorSettings
    from services.ingest.app import IngestService, IngestSettings
    from services.snowflake_loader.app import SnowflakeLoaderService
    from services.snowflake_loader.settings import LoaderSettings

    return [
        (Generator, GeneratorSettings),
        (IngestService, IngestSettings),
        (ClickHouseSinkService, ClickHouseSinkSettings),
        (ArchiverService, ArchiverSettings),
        (SnowflakeLoaderService, LoaderSettings),
    ]


@pytest.mark.parametrize(("service_cls", "settings_cls"), _services(), ids=lambda value: value.__name__)
def test_stop_after_a_start_that_set_nothing_up(tmp_path: Path, service_cls, settings_cls) -> None:
    service = service_cls(settings_from(settings_cls, _env(tmp_path)))
    service.stop()  # raises nothing
    assert not (tmp_path / "report.json").exists()  # no report of a run that never began


def test_the_frame_reports_the_start_failure_not_a_second_one_in_stop(tmp_path: Path, caplog) -> None:
    """The generator's start failing after its producer exists (the case that crashed stop() before)."""
    from services.generator.app import Generator, GeneratorSettings

    class FailingGenerator(Generator):
        def start(self) -> None:
            self.producer = type("Producer", (), {"flush": lambda self, timeout: None})()
            raise RuntimeError("start failed half-way")

    settings = settings_from(GeneratorSettings, _env(tmp_path))
    assert FailingGenerator(settings).run() == ExitCode.FAILED
    assert "shutdown failed" not in caplog.text
