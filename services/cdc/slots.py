"""Replication slots: list them, and drop the stale ones.

A logical slot that nobody reads keeps every WAL segment written after its position, until the disk fills. The
usual culprits are CDC runs that were renamed or removed (tests, experiments, an old deployment). `drop-stale`
only ever drops inactive logical slots of the connected database, never an active one and never the configured
slot (CDC_SLOT_NAME: it is ours even while the service is stopped, and dropping it would lose the changes
made meanwhile).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors, sql

from services.kit.durations import parse_duration as kit_parse_duration


@dataclass(frozen=True)
class SlotInfo:
    name: str
    slot_type: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    retained_wal_bytes: int | None  # WAL the server keeps for this slot
    confirmed_flush_lsn: str | None
    wal_status: str | None
    inactive_since: datetime | None  # PostgreSQL 17+; None before (or while active)


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `1d`, `1w`, or plain seconds (the `--older-than` flag)."""
    return kit_parse_duration(text, unitless_seconds=True)


def list_slots(conn: psycopg.Connection[Any]) -> list[SlotInfo]:
    has_inactive_since = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'pg_catalog.pg_replication_slots'::regclass "
        "AND attname = 'inactive_since')"
    ).fetchone()[0]  # type: ignore[index]
    inactive_since = "inactive_since" if has_inactive_since else "NULL::timestamptz"
    rows = conn.execute(
        "SELECT slot_name, slot_type, plugin, database, active, active_pid, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, confirmed_flush_lsn::text, wal_status, "
        f"{inactive_since} FROM pg_replication_slots ORDER BY slot_name"
    ).fetchall()
    return [
        SlotInfo(
            name=row[0],
            slot_type=row[1],
            plugin=row[2],
            database=row[3],
            active=bool(row[4]),
            active_pid=row[5],
            retained_wal_bytes=None if row[6] is None else int(row[6]),
            confirmed_flush_lsn=row[7],
            wal_status=row[8],
            inactive_since=row[9],
        )
        for row in rows
    ]


def stale_slots(
    slots: Iterable[SlotInfo],
    *,
    database: str,
    older_than: timedelta,
    keep: Iterable[str] = (),
    now: datetime | None = None,
) -> list[SlotInfo]:
    """The slots `drop-stale` would drop: inactive logical slots of `database`, not in `keep`, inactive for at least
    `older_than`. Before PostgreSQL 17 the inactive time is unknown; such slots count only when `older_than` is 0."""
    now = now or datetime.now(UTC)
    kept = set(keep)
    chosen = []
    for slot in slots:
        if slot.active or slot.slot_type != "logical" or slot.database != database or slot.name in kept:
            continue
        if slot.inactive_since is None:
            if older_than > timedelta(0):
                continue
        elif now - slot.inactive_since < older_than:
            continue
        chosen.append(slot)
    return chosen


def drop_slot(conn: psycopg.Connection[Any], name: str) -> str | None:
    """Drop an inactive slot; returns why it was not dropped (None when it was)."""
    try:
        row = conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s AND NOT active",
            (name,),
        ).fetchone()
    except (errors.ObjectInUse, errors.UndefinedObject) as error:  # became active, or gone, since it was listed
        return " ".join(str(error).split())
    return None if row is not None else "active or gone since it was listed"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "-"
    seconds = int((now - since).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def format_slots(slots: Iterable[SlotInfo], own_slot: str | None = None, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    header = ("SLOT", "TYPE", "PLUGIN", "DATABASE", "ACTIVE", "RETAINED_WAL", "INACTIVE_FOR", "CONFIRMED_FLUSH")
    rows = [header]
    for slot in slots:
        name = slot.name + (" (configured)" if slot.name == own_slot else "")
        active = f"yes (pid {slot.active_pid})" if slot.active else "no"
        rows.append(
            (
                name,
                slot.slot_type,
                slot.plugin or "-",
                slot.database or "-",
                active,
                _size(slot.retained_wal_bytes),
                "-" if slot.active else _age(slot.inactive_since, now),
                slot.confirmed_flush_lsn or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def drop_database_and_slots(admin_dsn: str, database: str, attempts: int = 50) -> None:
    """Drop `database` with its replication slots (tests and benchmarks make throwaway ones).

    A slot keeps its database alive, and an active one cannot be dropped: end its walsender first, then drop
    the slot once the server has released it.
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for (pid,) in conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE database = %s AND active_pid IS NOT NULL", (database,)
        ).fetchall():
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(attempts):
            rows = conn.execute(
                "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", (database,)
            ).fetchall()
            for slot, active in rows:
                if not active:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            if not rows:
                break
            time.sleep(0.1)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
