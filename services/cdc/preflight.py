"""Checks (and the few fixes) PostgreSQL needs before the JVM starts, each failing with one clear line.

Debezium itself reports a wrong port or a missing privilege as a Java stack trace somewhere in its log, minutes
of retries later or never; checking here first turns each into a sentence that says what to do. The fixes are
idempotent: REPLICA IDENTITY FULL on the captured tables (deletes and updates then carry the whole old row), the
heartbeat table, and the publication (captured tables plus the heartbeat table).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

from services.cdc.connector import HEARTBEAT_TABLE

log = logging.getLogger(__name__)

HEARTBEAT_DDL = (
    "CREATE TABLE IF NOT EXISTS public.debezium_heartbeat "
    "(id integer PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now())"
)


class PreflightError(RuntimeError):
    """PostgreSQL is not ready for CDC; the message is one line that says what to do."""


@dataclass
class PreflightReport:
    server_version: str = ""
    replica_identity_set: list[str] = field(default_factory=list)  # tables switched to REPLICA IDENTITY FULL
    heartbeat_table_created: bool = False
    publication: str = ""  # created / extended / ok
    slot_exists: bool = False
    stale_slots: list[str] = field(default_factory=list)


def where(dsn: str) -> str:
    """host:port of a DSN (never the password), for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable POSTGRES_DSN>"
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


def connect(dsn: str, *, connect_timeout: int = 5, application_name: str = "lp-cdc") -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout, application_name=application_name)
    except psycopg.OperationalError as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        reason = reason.removeprefix("connection failed: ")
        raise PreflightError(f"PostgreSQL at {where(dsn)} is unreachable or refused the connection: {reason}") from None


def _scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]  # constant query text
    return None if row is None else row[0]


def _split(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def run_preflight(
    dsn: str,
    tables: Sequence[str],
    publication: str,
    slot: str,
    *,
    offsets_present: bool = False,
) -> PreflightReport:
    """Check and prepare PostgreSQL for capturing `tables` through `publication` and `slot`.

    `offsets_present`: the offset store already has a position, so the slot must still exist (else the changes
    made while it was gone are lost without a trace, and Debezium would silently start from "now").
    """
    report = PreflightReport()
    with connect(dsn) as conn:
        report.server_version = str(_scalar(conn, "SHOW server_version"))
        user = str(_scalar(conn, "SELECT current_user"))
        _check_wal_level(conn)
        _check_role(conn, user)
        oids = _check_tables(conn, tables, user)
        report.replica_identity_set = _ensure_replica_identity(conn, tables, oids, user)
        report.heartbeat_table_created = _ensure_heartbeat_table(conn, user)
        report.publication = _ensure_publication(conn, publication, [*tables, HEARTBEAT_TABLE], user)
        report.slot_exists = _check_slot(conn, slot, offsets_present)
        report.stale_slots = _stale_slot_names(conn, slot)
    return report


def _check_wal_level(conn: psycopg.Connection[Any]) -> None:
    level = _scalar(conn, "SHOW wal_level")
    if level != "logical":
        raise PreflightError(
            f"wal_level is {level!r}, CDC needs 'logical': set wal_level = logical in postgresql.conf "
            "(ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        )


def _check_role(conn: psycopg.Connection[Any], user: str) -> None:
    row = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is None or not (row[0] or row[1]):
        raise PreflightError(
            f"user {user!r} lacks the REPLICATION attribute needed for logical replication: "
            f"ALTER ROLE {user} WITH REPLICATION (or use a role that has it)"
        )


def _check_tables(conn: psycopg.Connection[Any], tables: Sequence[str], user: str) -> dict[str, int]:
    oids: dict[str, int] = {}
    missing = []
    for table in tables:
        schema, name = _split(table)
        row = conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            missing.append(table)
        else:
            oids[table] = row[0]
    if missing:
        database = conn.info.dbname
        raise PreflightError(
            f"table{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found in database {database!r}: "
            "create the schema first (the generator applies schemas/postgres/oltp.sql) or fix CDC_TABLES"
        )
    unreadable = [t for t in tables if not _scalar(conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", (oids[t],))]
    if unreadable:
        raise PreflightError(
            f"user {user!r} lacks SELECT on {', '.join(unreadable)} (needed for the snapshot): "
            f"GRANT SELECT ON {', '.join(unreadable)} TO {user}"
        )
    return oids


def _ensure_replica_identity(
    conn: psycopg.Connection[Any], tables: Sequence[str], oids: dict[str, int], user: str
) -> list[str]:
    changed = []
    for table in tables:
        identity = _scalar(conn, "SELECT relreplident FROM pg_class WHERE oid = %s::oid", (oids[table],))
        if identity == "f":
            continue
        try:
            conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(_table_identifier(table)))
        except errors.InsufficientPrivilege:
            raise PreflightError(
                f"table {table} does not have REPLICA IDENTITY FULL (updates and deletes would lack the old row) and "
                f"user {user!r} cannot change it: run ALTER TABLE {table} REPLICA IDENTITY FULL as the table's owner"
            ) from None
        changed.append(table)
        log.info("set REPLICA IDENTITY FULL", extra={"table": table})
    return changed


def _ensure_heartbeat_table(conn: psycopg.Connection[Any], user: str) -> bool:
    exists = _scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (HEARTBEAT_TABLE,))
    if not exists:
        try:
            conn.execute(HEARTBEAT_DDL)
        except errors.InsufficientPrivilege:
            raise PreflightError(
                f"the heartbeat table {HEARTBEAT_TABLE} is missing and user {user!r} cannot create it: "
                f"as an owner run {HEARTBEAT_DDL} and GRANT INSERT, UPDATE ON {HEARTBEAT_TABLE} TO {user}"
            ) from None
    for privilege in ("INSERT", "UPDATE"):
        allowed = _scalar(conn, "SELECT has_table_privilege(%s, %s)", (HEARTBEAT_TABLE, privilege))
        if not allowed:
            raise PreflightError(
                f"user {user!r} lacks {privilege} on {HEARTBEAT_TABLE} (heartbeat.action.query writes it): "
                f"GRANT INSERT, UPDATE ON {HEARTBEAT_TABLE} TO {user}"
            )
    return not exists


def _table_identifier(table: str) -> sql.Composable:
    schema, name = _split(table)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def _ensure_publication(conn: psycopg.Connection[Any], publication: str, tables: Sequence[str], user: str) -> str:
    row = conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    name = sql.Identifier(publication)
    try:
        if row is None:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    name, sql.SQL(", ").join(_table_identifier(t) for t in tables)
                )
            )
            log.info("created publication", extra={"publication": publication, "tables": list(tables)})
            return "created"
        all_tables, *publishes = row
        if not all(publishes):
            raise PreflightError(
                f"publication {publication!r} does not publish inserts, updates and deletes: "
                f"ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete')"
            )
        if all_tables:
            return "ok"
        published = {
            f"{schema}.{table}"
            for schema, table in conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
            ).fetchall()
        }
        missing = [t for t in tables if ".".join(_split(t)) not in published]
        if not missing:
            return "ok"
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                name, sql.SQL(", ").join(_table_identifier(t) for t in missing)
            )
        )
        log.info("extended publication", extra={"publication": publication, "added": missing})
        return "extended"
    except errors.InsufficientPrivilege as error:
        raise PreflightError(
            f"user {user!r} cannot create or change publication {publication!r} ({' '.join(str(error).split())}): "
            f"as the tables' owner run CREATE PUBLICATION {publication} FOR TABLE {', '.join(tables)}"
        ) from None


def _check_slot(conn: psycopg.Connection[Any], slot: str, offsets_present: bool, wait_s: float = 15.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        row = conn.execute(
            "SELECT plugin, slot_type, database, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        # After a crash (kill -9) the server notices the dead replication connection within moments; a slot that
        # stays in use belongs to another reader, and two readers of one slot cannot work.
        if row is None or row[3] is None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if row is not None:
        plugin, slot_type, database, active_pid = row
        if active_pid is not None:
            raise PreflightError(
                f"replication slot {slot!r} is in use by server process {active_pid} (another CDC instance?): "
                "stop it, or choose another CDC_SLOT_NAME"
            )
        if slot_type != "logical" or plugin != "pgoutput":
            raise PreflightError(
                f"replication slot {slot!r} exists but is a {slot_type} slot with plugin {plugin!r}, not a pgoutput "
                "logical slot: choose another CDC_SLOT_NAME or drop it (python -m services.cdc slots list)"
            )
        if database != conn.info.dbname:
            raise PreflightError(
                f"replication slot {slot!r} belongs to database {database!r}, not {conn.info.dbname!r}: "
                "choose another CDC_SLOT_NAME"
            )
        return True
    if offsets_present:
        raise PreflightError(
            f"replication slot {slot!r} is gone but offsets for it exist, so changes made meanwhile are lost: "
            "delete CDC_OFFSETS_FILE to take a new snapshot (or restore the slot)"
        )
    used = _scalar(conn, "SELECT count(*) FROM pg_replication_slots")
    limit = int(_scalar(conn, "SHOW max_replication_slots"))
    if used >= limit:
        raise PreflightError(
            f"no free replication slot (max_replication_slots = {limit}, all used): drop stale ones with "
            "python -m services.cdc slots drop-stale, or raise max_replication_slots"
        )
    return False


def _stale_slot_names(conn: psycopg.Connection[Any], own_slot: str) -> list[str]:
    rows = conn.execute(
        "SELECT slot_name, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) "
        "FROM pg_replication_slots WHERE NOT active AND slot_name <> %s",
        (own_slot,),
    ).fetchall()
    if rows:
        log.warning(
            "inactive replication slots keep WAL on the server; drop the stale ones with "
            "python -m services.cdc slots drop-stale",
            extra={"inactive_slots": {name: retained for name, retained in rows}},
        )
    return [name for name, _ in rows]
