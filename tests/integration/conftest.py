"""Shared fixtures for integration tests: one real local stack per test session, on free ports."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import LocalStack, StackSettings
from services.stack.components import group_members, process_alive


def new_state_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    """A fresh state dir for a test stack, and whether the caller must delete it.

    As root, PostgreSQL runs as the user ``embedded_postgres``, which reaches its data dir through the "other"
    permission bits of every parent folder. Each pytest session that starts resets /tmp/pytest-of-root to
    0700, so with several sessions on one machine a stack under pytest's tmp dir can lose its data dir in
    the middle of initdb. As root we therefore use a plain temporary folder instead.
    """
    if os.geteuid() != 0:
        return tmp_path_factory.mktemp(name), False
    return Path(tempfile.mkdtemp(prefix=f"lp-{name}-")), True


@pytest.fixture
def stack_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state dir for a test's own LocalStack (``StackSettings.with_free_ports(state_dir=...)``)."""
    path, owned = new_state_dir(tmp_path_factory, "state")
    yield path
    if owned:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A started LocalStack (broker, postgres, s3, snowflake; prometheus if installed) in a temp state dir, free ports.

    Use ``stack.env()`` for the variables services read, or the attributes (``stack.bootstrap_servers``,
    ``stack.postgres_dsn``, ``stack.s3_endpoint``, ``stack.snowflake_connect_kwargs()``, ...).
    """
    state_dir, owned = new_state_dir(tmp_path_factory, "stack")
    local = LocalStack(StackSettings.with_free_ports(state_dir=state_dir))
    local.start()
    pids = [comp.pid for comp in local.components if comp.pid]
    try:
        yield local
    finally:
        local.stop()
        if owned:
            shutil.rmtree(state_dir, ignore_errors=True)
    leftovers = [pid for pid in pids if process_alive(pid) or group_members(pid)]
    assert not leftovers, f"processes left after LocalStack.stop(): {leftovers}"


@pytest.fixture(scope="session")
def stack_env(stack: LocalStack) -> dict[str, str]:
    """The environment variables of the session stack (KAFKA_BOOTSTRAP_SERVERS, POSTGRES_DSN, ...)."""
    return stack.env()
