"""The Iceberg catalog's settings from the environment: defaults, catalog choice, clear errors."""

from __future__ import annotations

import pytest

from services.kit.config import ConfigError, load_settings
from services.stores.iceberg import CatalogSettings, catalog_properties, sqlite_file


def test_sql_catalog_defaults_to_sqlite_under_the_state_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("S3_BUCKET", "lake")
    settings = CatalogSettings()
    props = catalog_properties(settings)
    assert props["type"] == "sql" and props["uri"] == f"sqlite:///{tmp_path}/iceberg/catalog.db"
    assert props["warehouse"] == "s3://lake/warehouse"


def test_rest_catalog_uses_the_s3_credentials_by_default(monkeypatch) -> None:
    monkeypatch.setenv("ICEBERG_CATALOG", "rest")
    monkeypatch.setenv("ICEBERG_REST_URI", "http://127.0.0.1:8181")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    props = catalog_properties(CatalogSettings())
    assert props["type"] == "rest" and props["credential"] == "key:secret"
    assert props["warehouse"] == "s3://lp-tables"
    assert props["s3.endpoint"] == "http://127.0.0.1:8333"


def test_rest_without_a_uri_is_a_configuration_error(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ICEBERG_CATALOG", "rest")
    monkeypatch.delenv("ICEBERG_REST_URI", raising=False)
    with pytest.raises(ConfigError):
        load_settings(CatalogSettings)
    assert "ICEBERG_REST_URI: must be set when ICEBERG_CATALOG=rest" in capsys.readouterr().err


def test_only_a_sqlite_file_is_locked_when_opening() -> None:
    assert str(sqlite_file("sqlite:////state/iceberg/catalog.db")) == "/state/iceberg/catalog.db"
    assert str(sqlite_file("sqlite:///relative.db")) == "relative.db"
    memory = "sqlite:///file:lake?mode=memory&uri=true"
    for uri in ("sqlite://", "sqlite:///:memory:", memory, "postgresql+psycopg://u:p@db/lake"):
        assert sqlite_file(uri) is None
