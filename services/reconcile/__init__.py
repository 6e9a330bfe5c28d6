"""Speed-versus-batch reconciliation: events and revenue per day and event type in ClickHouse, Iceberg, Snowflake.

`python -m services.reconcile` (docs/reconciliation.md); `reconcile(env)` for callers such as `make run`.
"""

from .compare import Report, Window
from .runner import StoresUnavailable, reconcile

__all__ = ["Report", "StoresUnavailable", "Window", "reconcile"]
