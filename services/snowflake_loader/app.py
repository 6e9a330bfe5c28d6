"""The loader service: every SNOWFLAKE_LOADER_INTERVAL_S, load what is new in the lake (docs/snowflake-loader.md).

On SIGTERM the load in progress finishes its current table (its transactions commit or roll back as a whole),
the remaining tables wait for the next start, and the process exits 0. A failed load is logged, counted
(`lp_snowflake_loader_failures_total`) and retried at the next interval; /readyz reports it until a load
succeeds again.
"""

from __future__ import annotations

import logging
import time

from services.kit.service import Service
from services.stores.iceberg import open_catalog, wait_for_storage
from services.stores.snowflake import Warehouse, connect, quiet_connector, wait_for_warehouse

from .loader import Loader, migrate
from .settings import LoaderSettings


class SnowflakeLoaderService(Service[LoaderSettings]):
    """`python -m services.snowflake_loader` (or `run`)."""

    def __init__(self, settings: LoaderSettings) -> None:
        super().__init__(settings)
        self.warehouse: Warehouse | None = None
        self.loader: Loader | None = None
        self.next_load = 0.0
        self.last_error: str | None = None

    def start(self) -> None:
        quiet_connector()
        logging.getLogger("pyiceberg").setLevel(max(logging.WARNING, logging.getLogger().level))
        wait_for_warehouse(self.settings, self.settings.dependency_wait_s)
        wait_for_storage(self.settings, self.settings.dependency_wait_s)
        self.warehouse = Warehouse(connect(self.settings))
        applied = migrate(self.warehouse, self.settings)
        if applied:
            self.log.info("applied migrations %s", applied)
        self.loader = Loader(self.settings, self.warehouse, open_catalog(self.settings))
        self.health.add_check("last_load", lambda: self.last_error)
        self.log.info(
            "loading %s every %ss into %s",
            ", ".join(self.settings.table_names),
            self.settings.snowflake_loader_interval_s,
            self.settings.database,
        )

    def step(self) -> bool:
        now = time.monotonic()
        if now < self.next_load:
            self.stopping.wait(min(1.0, self.next_load - now))
            return True
        assert self.loader is not None
        results = self.loader.run_once(stop=self.stopping.is_set)
        failed = [r for r in results if r.status == "failed"]
        self.last_error = "; ".join(f"{r.table}: {r.error}" for r in failed) or None
        self.next_load = time.monotonic() + self.settings.snowflake_loader_interval_s
        return True

    def stop(self) -> None:
        if self.warehouse is not None:
            self.warehouse.close()
