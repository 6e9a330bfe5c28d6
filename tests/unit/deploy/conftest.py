"""Fixtures shared by the chart and metric checks."""

from __future__ import annotations

import pytest

from tests.unit.deploy.served_metrics import Served, reconcile_pushed_metrics, serve_every_service_registry


@pytest.fixture(scope="session")
def service_metrics() -> Served:
    """What a scrape of every service stores (one child process for the whole session)."""
    return serve_every_service_registry()


@pytest.fixture(scope="session")
def reconcile_pushed() -> Served:
    """What the reconciliation job pushes."""
    return reconcile_pushed_metrics()
