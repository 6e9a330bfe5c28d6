"""Which replication slots `slots drop-stale` picks, and how `slots list` shows them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.cdc.slots import SlotInfo, format_slots, parse_duration, stale_slots

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def slot(name: str, **changes: object) -> SlotInfo:
    values: dict[str, object] = {
        "name": name,
        "slot_type": "logical",
        "plugin": "pgoutput",
        "database": "shop",
        "active": False,
        "active_pid": None,
        "retained_wal_bytes": 5 * 1024 * 1024,
        "confirmed_flush_lsn": "0/1B74A00",
        "wal_status": "reserved",
        "inactive_since": NOW - timedelta(hours=3),
    }
    values.update(changes)
    return SlotInfo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("0", 0), ("1.5h", 5400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "-1h", "2 hours", "1y"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_only_old_inactive_logical_slots_of_this_database_other_than_ours() -> None:
    slots = [
        slot("old"),
        slot("ours"),
        slot("active", active=True, active_pid=42, inactive_since=None),
        slot("physical", slot_type="physical", plugin=None),
        slot("elsewhere", database="other"),
        slot("recent", inactive_since=NOW - timedelta(minutes=5)),
        slot("unknown_age", inactive_since=None),  # PostgreSQL < 17
    ]
    chosen = stale_slots(slots, database="shop", older_than=timedelta(hours=1), keep=["ours"], now=NOW)
    assert [s.name for s in chosen] == ["old"]
    everything = stale_slots(slots, database="shop", older_than=timedelta(0), keep=["ours"], now=NOW)
    assert [s.name for s in everything] == ["old", "recent", "unknown_age"]  # never active, physical, ours


def test_format_slots_marks_the_configured_one() -> None:
    text = format_slots([slot("lp_cdc"), slot("busy", active=True, active_pid=7)], own_slot="lp_cdc", now=NOW)
    header, ours, busy = text.splitlines()
    assert header.split()[:3] == ["SLOT", "TYPE", "PLUGIN"]
    assert "lp_cdc (configured)" in ours and "5.0 MB" in ours and "3h" in ours
    assert "yes (pid 7)" in busy
