"""Read every store, compare, and hand back the report (the command and `make run` share this)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

from services.kit.config import ConfigError, settings_from

from .compare import Figures, Key, Report, Window, compare
from .settings import ReconcileSettings, parse_day, parse_stores
from .stores import StoreUnavailable, read_store


class StoresUnavailable(RuntimeError):
    """One or more stores could not be read; `errors` maps each to its message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{store} unavailable: {message}" for store, message in errors.items()))
        self.errors = dict(errors)


@dataclass
class Outcome:
    report: Report | None
    stores: tuple[str, ...]
    store_up: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    finished_at: float = 0.0


def window_of(settings: ReconcileSettings, since: date | str | None, until: date | str | None) -> Window:
    def day(value: date | str | None, fallback: str | None) -> date | None:
        value = value if value is not None else fallback
        if value is None or isinstance(value, date):
            return value
        return parse_day(value)

    return Window(day(since, settings.reconcile_since), day(until, settings.reconcile_until))


def run(
    env: Mapping[str, str],
    since: date | str | None = None,
    until: date | str | None = None,
    stores: Sequence[str] | str | None = None,
) -> Outcome:
    """Read the stores (each attempted, so every unreachable one is named) and compare them.

    Raises ConfigError (exit 2) for bad settings or arguments; a store that cannot be read is in `errors`.
    """
    started = time.monotonic()
    settings = settings_from(ReconcileSettings, env)
    try:
        names = (
            settings.stores if stores is None else parse_stores(stores if isinstance(stores, str) else ",".join(stores))
        )
    except ValueError as error:
        raise ConfigError(f"--stores: {error}") from None
    try:
        window = window_of(settings, since, until)
    except ValueError as error:
        raise ConfigError(f"--since/--until: {error}") from None
    per_store: dict[str, dict[Key, Figures]] = {}
    outcome = Outcome(None, names)
    for store in names:
        try:
            per_store[store] = read_store(store, env, window, settings)
            outcome.store_up[store] = True
        except StoreUnavailable as error:
            outcome.store_up[store] = False
            outcome.errors[store] = str(error).removeprefix(f"{store}: ")
    if not outcome.errors:
        outcome.report = compare(
            per_store, window, settings.reconcile_min_consistency, settings.reconcile_revenue_tolerance
        )
    outcome.duration_s = time.monotonic() - started
    outcome.finished_at = time.time()
    return outcome


def reconcile(
    env: Mapping[str, str],
    since: date | str | None = None,
    until: date | str | None = None,
    stores: Sequence[str] | str | None = None,
) -> Report:
    """The report for the stores in `env` (e.g. `{**LocalStack.env(), **archiver/sink/loader env}`).

    `since`/`until`: UTC days of event time, inclusive (date, YYYY-MM-DD, today, yesterday or -Nd); default
    RECONCILE_SINCE/RECONCILE_UNTIL, else all days. Raises ConfigError for bad settings, StoresUnavailable when
    a store cannot be read.
    """
    outcome = run(env, since, until, stores)
    if outcome.report is None:
        raise StoresUnavailable(outcome.errors)
    return outcome.report
