"""A local Iceberg catalog per test: SQLite + a file:// warehouse (the integration tests use SeaweedFS S3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyiceberg.catalog import Catalog

from services.kit.avro import SchemaRepository
from services.stores.iceberg import CatalogSettings, open_catalog


@pytest.fixture(scope="session")
def repository() -> SchemaRepository:
    return SchemaRepository.load()


@pytest.fixture
def catalog_settings(tmp_path: Path) -> CatalogSettings:
    return CatalogSettings(
        iceberg_catalog="sql",
        iceberg_sql_uri=f"sqlite:///{tmp_path}/catalog.db",
        iceberg_warehouse=f"file://{tmp_path}/warehouse",
        iceberg_namespace="test",
    )


@pytest.fixture
def catalog(catalog_settings: CatalogSettings) -> Catalog:
    return open_catalog(catalog_settings)
