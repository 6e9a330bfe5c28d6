"""Reference data (users, products) in memory, fed by CDC envelopes, for LOOKUP rules and enrichment.

Idempotent on replays: each key remembers the source LSN of the change that produced its current state, and
an envelope whose LSN is not newer is ignored. A delete keeps its LSN as a marker (bounded), so replaying a
topic from the start does not resurrect a deleted row. E-mail columns are hashed on the way in: the raw
address never sits in the validator's memory, so it cannot leak into an output, a log or a dump.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.contracts.envelope import OP_DELETE, OP_READ
from services.validator.cdc import PRODUCTS, USERS, ChangeEvent, TableSpec, parse_envelope, parse_key
from services.validator.enrich import VIEWS, hash_email

DEFAULT_MAX_DELETED = 100_000


class ApplyResult(StrEnum):
    UPSERTED = "upserted"
    DELETED = "deleted"
    STALE = "stale"  # not newer than what the store holds: a replay or an out-of-order duplicate
    IGNORED = "ignored"  # a tombstone for an unknown key, or a change without a key


@dataclass
class _Table:
    spec: TableSpec
    rows: dict[str, dict[str, Any]]
    versions: dict[str, int | None]  # LSN of each live row's current state
    deleted: OrderedDict[str, int | None]  # LSN of recent deletes (replay protection), oldest first
    view: Callable[[Mapping[str, Any]], dict[str, Any]] | None  # the row as enrichment fields
    views: dict[str, dict[str, Any]]


class ReferenceStore:
    def __init__(
        self,
        tables: Mapping[str, TableSpec] | None = None,
        *,
        max_deleted: int = DEFAULT_MAX_DELETED,
        views: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = VIEWS,
    ) -> None:
        specs = tables if tables is not None else {"users": USERS, "products": PRODUCTS}
        self._tables = {name: _Table(spec, {}, {}, OrderedDict(), views.get(name), {}) for name, spec in specs.items()}
        self.max_deleted = max_deleted
        self.results: Counter[tuple[str, str]] = Counter()  # (table, ApplyResult) -> count, for metrics

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(self._tables)

    def _table(self, table: str) -> _Table:
        try:
            return self._tables[table]
        except KeyError:
            raise KeyError(f"unknown reference table {table!r}; known: {sorted(self._tables)}") from None

    # -- reads (hot path) -------------------------------------------------------------------------------------------
    def contains(self, table: str, key: Any) -> bool:
        return key in self._tables[table].rows

    def get(self, table: str, key: Any) -> Mapping[str, Any] | None:
        return self._tables[table].rows.get(key)

    def view(self, table: str, key: Any) -> Mapping[str, Any] | None:
        """The row as enrichment fields (`enrich.VIEWS`), precomputed when the row changed."""
        return self._tables[table].views.get(key)

    def size(self, table: str) -> int:
        return len(self._table(table).rows)

    # -- writes -----------------------------------------------------------------------------------------------------
    def apply_envelope(
        self, table: str, key: bytes | str | Mapping[str, Any] | None, envelope: bytes | str | Mapping[str, Any] | None
    ) -> ApplyResult:
        """Apply one record of `cdc.postgres.<table>`; raises `CdcFormatError` if it is not an envelope."""
        state = self._table(table)
        change = parse_envelope(envelope, table, state.spec)
        key_value = state.spec.typed_key(parse_key(key, state.spec.primary_key))
        if change is None:
            return self._count(table, self._tombstone(state, key_value))
        return self.apply_change(change, key_value)

    def check_envelope(self, table: str, key: bytes | str | Mapping[str, Any] | None, envelope: Any) -> None:
        """Parse one record of `cdc.postgres.<table>` without applying it; raises `CdcFormatError` if unreadable."""
        spec = self._table(table).spec
        parse_envelope(envelope, table, spec)
        spec.typed_key(parse_key(key, spec.primary_key))

    def apply_change(self, change: ChangeEvent, key: str | None = None) -> ApplyResult:
        """Apply a parsed change; `key` defaults to the row's primary key."""
        state = self._table(change.table)
        if key is None:
            pk = change.row.get(state.spec.primary_key)
            key = None if pk is None else str(pk)
        return self._count(change.table, ApplyResult.IGNORED if key is None else self._apply(state, change, key))

    def put(self, table: str, row: Mapping[str, Any], lsn: int | None = None) -> ApplyResult:
        """Insert a typed row directly (bootstrap from a database query, tests)."""
        state = self._table(table)
        key = row[state.spec.primary_key]
        change = ChangeEvent(table, OP_READ, None, dict(row), lsn, None, None, True)
        return self._count(table, self._apply(state, change, key))

    def _apply(self, state: _Table, change: ChangeEvent, key: str) -> ApplyResult:
        lsn = change.lsn
        if lsn is not None:
            known = state.versions.get(key) if key in state.versions else state.deleted.get(key)
            if known is not None and lsn <= known:
                return ApplyResult.STALE
        if change.op == OP_DELETE:
            state.rows.pop(key, None)
            state.views.pop(key, None)
            state.versions.pop(key, None)
            self._mark_deleted(state, key, lsn)
            return ApplyResult.DELETED
        row = state.rows[key] = self._stored_row(state.spec, change.after or {})
        if state.view is not None:
            state.views[key] = state.view(row)
        state.versions[key] = lsn
        state.deleted.pop(key, None)
        return ApplyResult.UPSERTED

    def _tombstone(self, state: _Table, key: str | None) -> ApplyResult:
        # The delete envelope normally came first and did the work; a tombstone alone (e.g. the delete was
        # compacted away) still removes the row, keeping the row's LSN as the replay marker.
        if key is None or key not in state.rows:
            return ApplyResult.IGNORED
        del state.rows[key]
        state.views.pop(key, None)
        self._mark_deleted(state, key, state.versions.pop(key, None))
        return ApplyResult.DELETED

    def _mark_deleted(self, state: _Table, key: str, lsn: int | None) -> None:
        state.deleted[key] = lsn
        state.deleted.move_to_end(key)
        while len(state.deleted) > self.max_deleted:
            state.deleted.popitem(last=False)

    @staticmethod
    def _stored_row(spec: TableSpec, row: Mapping[str, Any]) -> dict[str, Any]:
        stored = {k: row.get(k) for k in spec.keep} if spec.keep is not None else dict(row)
        for column in spec.pii_email:
            if stored.get(column) is not None:
                stored[column] = hash_email(stored[column])
        return stored

    def _count(self, table: str, result: ApplyResult) -> ApplyResult:
        self.results[(table, result)] += 1
        return result
