"""The comparison: per (UTC day of event time, event type) cell, rows, events and revenue in every store.

Rows and events: `events` are the distinct event ids a store holds, `rows` its rows. Exactly one row per event
is the pipeline's promise, so a cell where a store's rows differ from its events is a `duplicates` cell, and
any duplicate row anywhere makes the verdict DISAGREE whatever the consistency (docs/reconciliation.md).

Consistency (docs/reconciliation.md):
- a cell's events agree on min over stores (a store without the cell has 0) out of max over stores;
  events consistency = sum of the mins / sum of the maxes;
- a cell's revenues are equal when they differ by at most max(1 cent, tolerance x the largest); equal revenues
  agree fully, otherwise on the smallest: revenue consistency = sum of agreed / sum of the largest;
- a cell's rows agree on the fewest distinct events out of the most rows of any store;
  rows consistency = sum of those / sum of the most rows;
- consistency = the lowest of the three; the stores agree when it reaches the minimum consistency and no
  store holds a duplicate row.
A window with no events at all is consistent (1.0): nothing disagrees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

CENT = 0.01

Key = tuple[date, str]


@dataclass(frozen=True)
class Figures:
    events: int  # distinct event ids
    revenue: float  # each event's amount summed once
    rows: int = -1  # rows the store holds (-1: as many as events)

    def __post_init__(self) -> None:
        if self.rows < 0:
            object.__setattr__(self, "rows", self.events)

    @property
    def duplicates(self) -> int:
        return self.rows - self.events


StoreCells = Mapping[Key, Figures]


@dataclass(frozen=True)
class Window:
    """Whole UTC days of event time, both ends inclusive; None: open."""

    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"the window is empty: since {self.since} is after until {self.until}")

    def contains(self, day: date) -> bool:
        return (self.since is None or day >= self.since) and (self.until is None or day <= self.until)

    def describe(self) -> str:
        if self.since is None and self.until is None:
            return "all days"
        return f"{self.since or '...'} .. {self.until or '...'}"


@dataclass(frozen=True)
class Cell:
    day: date
    event_type: str
    figures: dict[str, Figures | None]  # None: the store has no such cell
    status: str  # ok | missing | events | duplicates | revenue
    stores: tuple[str, ...]  # the stores that differ (empty when ok)
    detail: str
    agreed_events: int
    max_events: int
    agreed_revenue: float
    max_revenue: float
    max_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def revenues_equal(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= max(CENT, tolerance * max(abs(a), abs(b)))


def _outliers(values: Mapping[str, float], equal: Callable[[float, float], bool]) -> tuple[str, ...]:
    """The stores whose value differs from a strict majority's; every store when there is no majority."""
    names = list(values)
    votes = {name: sum(equal(values[name], values[other]) for other in names) for name in names}
    leader = max(names, key=lambda name: votes[name])
    if votes[leader] * 2 > len(names):
        return tuple(name for name in names if not equal(values[name], values[leader]))
    return tuple(names)


def _money(value: float) -> str:
    return f"{value:.2f}"


def compare_cell(key: Key, figures: dict[str, Figures | None], tolerance: float) -> Cell:
    events = {store: (f.events if f else 0) for store, f in figures.items()}
    rows = {store: (f.rows if f else 0) for store, f in figures.items()}
    duplicated = tuple(store for store in figures if rows[store] != events[store])
    revenue = {store: (f.revenue if f else 0.0) for store, f in figures.items()}
    most, least = max(events.values()), min(events.values())
    top = max(abs(r) for r in revenue.values())
    revenue_ok = all(revenues_equal(r, o, tolerance) for r in revenue.values() for o in revenue.values())
    agreed_revenue = top if revenue_ok else min(abs(r) for r in revenue.values())
    missing = tuple(store for store, f in figures.items() if f is None)
    if missing:
        status, stores = "missing", missing
        present = ", ".join(f"{s}={events[s]}" for s in figures if s not in missing)
        detail = f"missing in {', '.join(missing)} ({present} events)"
    elif most != least:
        status, stores = "events", _outliers({s: float(n) for s, n in events.items()}, lambda a, b: a == b)
        majority = [s for s in figures if s not in stores]
        versus = f" vs {events[majority[0]]} in {', '.join(majority)}" if majority else ""
        detail = "events " + ", ".join(f"{s}={events[s]}" for s in stores) + versus
    elif duplicated:
        status, stores = "duplicates", duplicated
        detail = "duplicate rows " + ", ".join(f"{s}={rows[s]} rows of {events[s]} events" for s in duplicated)
    elif not revenue_ok:
        status, stores = "revenue", _outliers(revenue, lambda a, b: revenues_equal(a, b, tolerance))
        majority = [s for s in figures if s not in stores]
        versus = f" vs {_money(revenue[majority[0]])} in {', '.join(majority)}" if majority else ""
        detail = "revenue " + ", ".join(f"{s}={_money(revenue[s])}" for s in stores) + versus
    else:
        status, stores, detail = "ok", (), "ok"
    return Cell(key[0], key[1], figures, status, stores, detail, least, most, agreed_revenue, top, max(rows.values()))


def _ratio(agreed: float, total: float) -> float:
    return 1.0 if total == 0 else agreed / total


@dataclass
class Report:
    stores: tuple[str, ...]
    cells: list[Cell]
    window: Window
    min_consistency: float
    revenue_tolerance: float

    @property
    def events_consistency(self) -> float:
        return _ratio(sum(c.agreed_events for c in self.cells), sum(c.max_events for c in self.cells))

    @property
    def revenue_consistency(self) -> float:
        return _ratio(sum(c.agreed_revenue for c in self.cells), sum(c.max_revenue for c in self.cells))

    @property
    def rows_consistency(self) -> float:
        return _ratio(sum(c.agreed_events for c in self.cells), sum(c.max_rows for c in self.cells))

    @property
    def consistency(self) -> float:
        return min(self.events_consistency, self.rows_consistency, self.revenue_consistency)

    @property
    def duplicate_rows(self) -> dict[str, int]:
        """Per store: rows beyond one per event in the window (0 is the promise)."""
        return {store: figures.duplicates for store, figures in self.totals().items()}

    @property
    def agrees(self) -> bool:
        """Within the minimum consistency, and not one duplicate row in any store (exactly one row per event)."""
        return self.consistency >= self.min_consistency and not any(self.duplicate_rows.values())

    @property
    def differing(self) -> list[Cell]:
        return [c for c in self.cells if not c.ok]

    def totals(self) -> dict[str, Figures]:
        out = {}
        for store in self.stores:
            present = [c.figures[store] for c in self.cells if c.figures[store] is not None]
            out[store] = Figures(
                sum(f.events for f in present),  # type: ignore[union-attr]
                sum(f.revenue for f in present),  # type: ignore[union-attr]
                sum(f.rows for f in present),  # type: ignore[union-attr]
            )
        return out

    def columns(self) -> list[str]:
        measures = ("events", "rows", "revenue")
        return ["day", "event_type", *(f"{s} {m}" for s in self.stores for m in measures), "status"]

    def rows(self, only_differences: bool = False) -> list[list[Any]]:
        """The table: day, event type, events, rows and revenue per store (None: no such cell), status."""
        out: list[list[Any]] = []
        for cell in self.cells:
            if only_differences and cell.ok:
                continue
            values: list[Any] = []
            for store in self.stores:
                figures = cell.figures[store]
                values += (
                    [None, None, None] if figures is None else [figures.events, figures.rows, round(figures.revenue, 2)]
                )
            out.append([cell.day.isoformat(), cell.event_type, *values, cell.detail])
        return out

    def verdict(self) -> str:
        word = "AGREE" if self.agrees else "DISAGREE"
        cells = f"{len(self.cells)} cells, {len(self.differing)} differing"
        if not self.cells:
            cells = "no events in the window"
        duplicated = {store: n for store, n in self.duplicate_rows.items() if n}
        duplicates = (
            "; duplicate rows: " + ", ".join(f"{store} {n}" for store, n in duplicated.items()) if duplicated else ""
        )
        return (
            f"verdict: {word}: consistency {self.consistency:.4%} (events {self.events_consistency:.4%}, "
            f"rows {self.rows_consistency:.4%}, revenue {self.revenue_consistency:.4%}), minimum "
            f"{self.min_consistency:.4%}{duplicates}; {', '.join(self.stores)}; {self.window.describe()}; {cells}"
        )

    def render(self, only_differences: bool = False) -> str:
        return render_table(self.columns(), self.rows(only_differences)) + "\n" + self.verdict()

    def summary_lines(self, limit: int = 10) -> list[str]:
        """For the run summary: totals per store, the verdict, and the first differing cells."""
        return summary_lines(self.as_dict(), limit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "agrees": self.agrees,
            "verdict": self.verdict(),
            "consistency": self.consistency,
            "events_consistency": self.events_consistency,
            "rows_consistency": self.rows_consistency,
            "duplicate_rows": self.duplicate_rows,
            "revenue_consistency": self.revenue_consistency,
            "min_consistency": self.min_consistency,
            "revenue_tolerance": self.revenue_tolerance,
            "stores": list(self.stores),
            "since": self.window.since.isoformat() if self.window.since else None,
            "until": self.window.until.isoformat() if self.window.until else None,
            "totals": {
                s: {"events": f.events, "rows": f.rows, "revenue": round(f.revenue, 2)}
                for s, f in self.totals().items()
            },
            "cells": [
                {
                    "day": c.day.isoformat(),
                    "event_type": c.event_type,
                    "events": {s: (f.events if f else None) for s, f in c.figures.items()},
                    "rows": {s: (f.rows if f else None) for s, f in c.figures.items()},
                    "revenue": {s: (round(f.revenue, 2) if f else None) for s, f in c.figures.items()},
                    "status": c.status,
                    "stores": list(c.stores),
                    "detail": c.detail,
                }
                for c in self.cells
            ],
        }


def summary_lines(body: Mapping[str, Any], limit: int = 10) -> list[str]:
    """Run-summary lines from a report's `as_dict()` (or the command's --json output)."""
    lines = [
        f"  reconcile {store:<11} {totals['events']} events, {totals.get('rows', totals['events'])} rows, "
        f"revenue {_money(totals['revenue'])}"
        for store, totals in body["totals"].items()
    ]
    lines.append(f"  reconcile {body['verdict']}")
    differing = [c for c in body["cells"] if c["status"] != "ok"]
    for cell in differing[:limit]:
        lines.append(f"    differs       {cell['day']} {cell['event_type']}: {cell['detail']}")
    if len(differing) > limit:
        lines.append(f"    ... and {len(differing) - limit} more differing cells")
    return lines


def compare(
    per_store: Mapping[str, StoreCells],
    window: Window = Window(),  # frozen: a shared default is safe
    min_consistency: float = 0.999,
    revenue_tolerance: float = 1e-6,
) -> Report:
    """Compare the stores' cells inside `window` (cells outside it are ignored, whatever a store returned)."""
    stores = tuple(per_store)
    if len(stores) < 2:
        raise ValueError("compare at least two stores")
    keys = sorted({key for cells in per_store.values() for key in cells if window.contains(key[0])})
    cells = [compare_cell(key, {s: per_store[s].get(key) for s in stores}, revenue_tolerance) for key in keys]
    return Report(stores, cells, window, min_consistency, revenue_tolerance)


def cells_from_rows(rows: Iterable[Sequence[Any]]) -> dict[Key, Figures]:
    """[(day, event_type, rows, events, revenue)] -> cells (without `rows`, 4 columns: one row per event); a day
    given as text or date, revenue None -> 0."""
    out: dict[Key, Figures] = {}
    for row in rows:
        day, event_type, *counts, revenue = row
        events = int(counts[-1] or 0)
        key = (day if isinstance(day, date) else date.fromisoformat(str(day)[:10]), str(event_type))
        figures = Figures(events, float(revenue or 0), int(counts[0] or 0) if len(counts) == 2 else events)
        if key in out:  # a store that returns a key twice: add up rather than lose a row
            previous = out[key]
            figures = Figures(
                previous.events + figures.events, previous.revenue + figures.revenue, previous.rows + figures.rows
            )
        out[key] = figures
    return out


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table; numbers right-aligned, absent values shown as '-'."""
    cells = [["-" if v is None else (_money(v) if isinstance(v, float) else str(v)) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows) for i in range(len(columns))
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join((v.rjust(w) if n else v.ljust(w)) for v, w, n in zip(row, widths, numeric, strict=True)).rstrip()
        )
    if not rows:
        lines.append("(no events in the window)")
    return "\n".join(lines)


def store_counts(report: Report) -> dict[str, Counter[str]]:
    """Per store: how many cells name it as differing, by status."""
    out: dict[str, Counter[str]] = {store: Counter() for store in report.stores}
    for cell in report.differing:
        for store in cell.stores:
            out[store][cell.status] += 1
    return out
