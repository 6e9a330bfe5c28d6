"""The loader service: every SNOWFLAKE_LOADER_INTERVAL_S, load what is new in the lake (docs/snowflake-loader.md).

On SIGTERM the load in progress finishes its current table (its transactions commit or roll back as a whole),
the remaining tables wait for the next start, and the process exits 0. A failed load is logged, counted
(`lp_snowflake_loader_failures_total`) and retried at the next interval; /readyz reports it until a load
succeeds again.

Sessions heal: after a failed load the loader asks the warehouse `SELECT 1`; when the session is gone (the
warehouse restarted, the token expired) it opens a new one with backoff (one log line per attempt), sets it
up again (`migrate`: schema, stage) and loads at once, catching up without a restart. /readyz also probes the
warehouse and the catalog on sessions of their own, bounded by HEALTH_PROBE_TIMEOUT_S, so a hung warehouse
reads as not ready; HEALTH_PROGRESS_BUDGET_S of that and /healthz fails (docs/snowflake-loader.md).
"""

from __future__ import annotations

import logging
import time

from services.kit.reconnect import ReconnectAborted
from services.kit.service import Service
from services.stores.iceberg import catalog_problem, open_catalog, wait_for_storage
from services.stores.snowflake import Warehouse, WarehouseProbe, quiet_connector, wait_for_warehouse

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
        self.probe: WarehouseProbe | None = None

    def start(self) -> None:
        quiet_connector()
        logging.getLogger("pyiceberg").setLevel(max(logging.WARNING, logging.getLogger().level))
        wait_for_warehouse(self.settings, self.settings.dependency_wait_s)
        wait_for_storage(self.settings, self.settings.dependency_wait_s)
        self.warehouse = Warehouse.open(self.settings)
        applied = migrate(self.warehouse, self.settings)
        if applied:
            self.log.info("applied migrations %s", applied)
        # A new session (after the warehouse restarted) needs its schema and stage again (fakesnow forgets stages).
        self.warehouse.on_reconnect.append(lambda warehouse: migrate(warehouse, self.settings) and None)
        catalog = open_catalog(self.settings)
        self.loader = Loader(self.settings, self.warehouse, catalog)
        self.probe = WarehouseProbe(self.settings, timeout_s=max(5, int(2 * self.health.probe_timeout_s)))
        self.health.add_check("warehouse", self.probe)
        self.health.add_check("catalog", lambda: catalog_problem(catalog))
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
        assert self.loader is not None and self.warehouse is not None
        results = self.loader.run_once(stop=self.stopping.is_set, progress=self.health.beat)
        failed = [r for r in results if r.status == "failed"]
        self.last_error = "; ".join(f"{r.table}: {r.error}" for r in failed) or None
        self.next_load = time.monotonic() + self.settings.snowflake_loader_interval_s
        if failed:
            try:
                if self.warehouse.heal(health=self.health, stopping=self.stopping):
                    self.next_load = time.monotonic()  # a new session: catch up now, not an interval later
            except ReconnectAborted:
                return False  # stopping while the warehouse is away: nothing to flush
        return True

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.warehouse is not None:
            self.warehouse.close()
