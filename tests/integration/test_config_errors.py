"""Configuration that fails fast and clearly, as an operator sees it: each service's module run as a process.

A malformed address (broker list, DSN, URL, host, port) exits 2 at once with one message naming the variable,
no trace and no client noise. A well-formed address where nothing listens gives, after the bounded start-up
wait (DEPENDENCY_WAIT_S, short here), one line naming the variable and the address, and exit 1. Neither needs a
running stack: the ports used are free ones nothing listens on (or a bare listener standing in for a server
that is up).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kit.exits import ExitCode
from services.testing.net import free_port
from services.testing.processes import run_module

SECRET = "hunter2"
TIMEOUT = 120  # a process's start-up (imports) on a loaded machine; each case takes a few seconds

# Variables a developer's shell may export that would change what a case tests.
CLEARED = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "POSTGRES_DSN",
    "S3_ENDPOINT_URL",
    "ICEBERG_CATALOG",
    "ICEBERG_REST_URI",
    "ICEBERG_SQL_URI",
    "SNOWFLAKE_HOST",
    "SNOWFLAKE_PORT",
    "CLICKHOUSE_CLIENT",
    "CLICKHOUSE_HOST",
    "CLICKHOUSE_PORT",
    "CLICKHOUSE_SINK_QUERY_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "RECONCILE_PUSHGATEWAY_URL",
)


@pytest.fixture
def base_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What every case shares: nothing from the developer's environment, local state in tmp_path, a short wait."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    return {
        "HTTP_PORT": "0",
        "DEPENDENCY_WAIT_S": "1",
        "LOG_FORMAT": "json",
        "LP_STATE_DIR": str(tmp_path / "state"),
        "ICEBERG_SQL_URI": f"sqlite:///{tmp_path}/catalog.db",
        "CLICKHOUSE_CHDB_PATH": str(tmp_path / "chdb"),
        "CDC_OFFSETS_FILE": str(tmp_path / "cdc.offsets"),
        "SNOWFLAKE_LOADER_WORK_DIR": str(tmp_path / "sf"),
        "CLICKHOUSE_SINK_QUERY_PORT": "-1",
    }


def _nothing_listens() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def listener() -> Iterator[str]:
    """A TCP listener that accepts and says nothing: a dependency that is up, as far as reaching it goes."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _service_env() -> dict[str, dict[str, str]]:
    """Each service module's required variables, all well-formed (nothing listens at these addresses)."""
    broker = _nothing_listens()
    dsn = f"postgresql://lp:{SECRET}@{_nothing_listens()}/shop"
    snowflake = {
        "SNOWFLAKE_ACCOUNT": "lp_local",
        "SNOWFLAKE_USER": "lp",
        "SNOWFLAKE_PASSWORD": SECRET,
        "SNOWFLAKE_DATABASE": "LAMBDA_PIPELINE",
    }
    return {
        "services.generator": {"KAFKA_BOOTSTRAP_SERVERS": broker, "POSTGRES_DSN": dsn},
        "services.ingest": {"KAFKA_BOOTSTRAP_SERVERS": broker},
        "services.cdc": {"KAFKA_BOOTSTRAP_SERVERS": broker, "POSTGRES_DSN": dsn},
        "services.validator": {"KAFKA_BOOTSTRAP_SERVERS": broker},
        "services.clickhouse_sink": {"KAFKA_BOOTSTRAP_SERVERS": broker},
        "services.archiver": {"KAFKA_BOOTSTRAP_SERVERS": broker},
        "services.snowflake_loader": snowflake,
        "services.reconcile": snowflake,
        "services.stack": {},
    }


def _run(module: str, *args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    result = run_module(module, *args, env=env, timeout=TIMEOUT)
    output = (result.stdout + result.stderr).strip()
    return result, [line for line in output.splitlines() if line.strip()]


# (module, command arguments, the malformed variable, its value)
MALFORMED = [
    ("services.generator", (), "KAFKA_BOOTSTRAP_SERVERS", "not a url"),
    ("services.generator", (), "POSTGRES_DSN", f"not a dsn password={SECRET}"),
    ("services.generator", (), "OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
    ("services.generator", (), "HTTP_PORT", "70000"),
    ("services.ingest", (), "GRPC_BIND_HOST", "not a host"),
    ("services.ingest", (), "GRPC_PORT", "-1"),
    ("services.ingest", (), "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092,,kafka:9092"),
    ("services.cdc", (), "POSTGRES_DSN", f"mysql://lp:{SECRET}@db/shop"),
    ("services.cdc", (), "KAFKA_BOOTSTRAP_SERVERS", "kafka"),
    ("services.validator", (), "KAFKA_BOOTSTRAP_SERVERS", "kafka:port"),
    ("services.validator", (), "OTEL_EXPORTER_OTLP_ENDPOINT", "tempo:4318"),
    ("services.clickhouse_sink", (), "CLICKHOUSE_HOST", "not a host"),
    ("services.clickhouse_sink", (), "CLICKHOUSE_PORT", "0"),
    ("services.clickhouse_sink", (), "CLICKHOUSE_SINK_QUERY_HOST", "not a host"),
    ("services.clickhouse_sink", ("query", "counts"), "CLICKHOUSE_SINK_QUERY_URL", "not a url"),
    ("services.archiver", (), "S3_ENDPOINT_URL", "not a url"),
    ("services.archiver", (), "KAFKA_BOOTSTRAP_SERVERS", "not a url"),
    ("services.archiver", ("stats",), "S3_ENDPOINT_URL", "s3.local:8333"),
    ("services.archiver", ("stats",), "ICEBERG_REST_URI", "not a url"),
    ("services.snowflake_loader", (), "S3_ENDPOINT_URL", "not a url"),
    ("services.snowflake_loader", ("run-once",), "S3_ENDPOINT_URL", "ftp://s3.local"),
    ("services.snowflake_loader", (), "SNOWFLAKE_HOST", "not a host"),
    ("services.snowflake_loader", ("migrate",), "SNOWFLAKE_PORT", "99999"),
    ("services.reconcile", (), "RECONCILE_PUSHGATEWAY_URL", "not a url"),
    ("services.reconcile", (), "S3_ENDPOINT_URL", "not a url"),
    ("services.stack", ("status",), "LP_BROKER_PORT", "70000"),
]


@pytest.mark.parametrize(
    ("module", "args", "variable", "value"),
    MALFORMED,
    ids=[f"{m.removeprefix('services.')}{'-' + a[0] if a else ''}-{v}" for m, a, v, _ in MALFORMED],
)
def test_a_malformed_variable_exits_2_naming_it(
    base_env: dict[str, str], module: str, args: tuple[str, ...], variable: str, value: str
) -> None:
    env = {**base_env, **_service_env()[module], variable: value}
    if variable == "ICEBERG_REST_URI":
        env["ICEBERG_CATALOG"] = "rest"
    result, lines = _run(module, *args, env=env)
    output = "\n".join(lines)
    assert result.returncode == ExitCode.CONFIG, output
    named = [line for line in lines if line.strip().startswith(f"{variable}:")]
    assert len(named) == 1, output  # one line names the variable and says what is wrong
    assert "Traceback" not in output
    assert len(lines) <= 4, output
    assert SECRET not in output


# --- nothing listening at a well-formed address ------------------------------------------------------------------


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], lines: list[str], expected: str) -> None:
    output = "\n".join(lines)
    assert result.returncode == ExitCode.FAILED, output
    unreachable = [line for line in lines if "unreachable after" in line]
    assert len(unreachable) == 1 and expected in unreachable[0], output
    assert "Traceback" not in output
    assert "%3|" not in output  # librdkafka's own log lines
    assert SECRET not in output
    assert len(lines) <= 5, output


def test_an_unreachable_broker_is_one_line(base_env: dict[str, str]) -> None:
    broker = _nothing_listens()
    for module in ("services.validator", "services.ingest"):
        result, lines = _run(module, env={**base_env, "KAFKA_BOOTSTRAP_SERVERS": broker})
        _assert_one_clear_line(result, lines, f"KAFKA_BOOTSTRAP_SERVERS={broker} unreachable after 1 s")


def test_an_unreachable_postgres_is_one_line(base_env: dict[str, str]) -> None:
    postgres = _nothing_listens()
    env = {**base_env, **_service_env()["services.generator"]}
    env["POSTGRES_DSN"] = f"postgresql://lp:{SECRET}@{postgres}/shop"
    result, lines = _run("services.generator", env=env)
    _assert_one_clear_line(result, lines, f"POSTGRES_DSN={postgres} unreachable after 1 s")


def test_an_unreachable_s3_is_one_line_and_fails_the_loader(base_env: dict[str, str], listener: str) -> None:
    s3 = f"http://{_nothing_listens()}"
    host, port = listener.split(":")
    loader_env = {
        **base_env,
        **_service_env()["services.snowflake_loader"],
        "SNOWFLAKE_HOST": host,  # reachable: the loader gets as far as the lake
        "SNOWFLAKE_PORT": port,
        "SNOWFLAKE_PROTOCOL": "http",
        "S3_ENDPOINT_URL": s3,
    }
    for args in ((), ("run-once",)):
        result, lines = _run("services.snowflake_loader", *args, env=loader_env)
        _assert_one_clear_line(result, lines, f"S3_ENDPOINT_URL={s3} unreachable after 1 s")
    archiver_env = {**base_env, **_service_env()["services.archiver"], "S3_ENDPOINT_URL": s3}
    result, lines = _run("services.archiver", env=archiver_env)
    _assert_one_clear_line(result, lines, f"S3_ENDPOINT_URL={s3} unreachable after 1 s")


def test_an_unreachable_snowflake_is_one_line(base_env: dict[str, str]) -> None:
    host, port = _nothing_listens().split(":")
    env = {
        **base_env,
        **_service_env()["services.snowflake_loader"],
        "SNOWFLAKE_HOST": host,
        "SNOWFLAKE_PORT": port,
        "SNOWFLAKE_PROTOCOL": "http",
    }
    result, lines = _run("services.snowflake_loader", env=env)
    _assert_one_clear_line(result, lines, f"SNOWFLAKE_HOST={host}:{port} unreachable after 1 s")


def test_an_unreachable_clickhouse_is_one_line(base_env: dict[str, str]) -> None:
    host, port = _nothing_listens().split(":")
    env = {
        **base_env,
        **_service_env()["services.clickhouse_sink"],
        "CLICKHOUSE_CLIENT": "native",
        "CLICKHOUSE_HOST": host,
        "CLICKHOUSE_PORT": port,
    }
    result, lines = _run("services.clickhouse_sink", env=env)
    _assert_one_clear_line(result, lines, f"CLICKHOUSE_HOST={host}:{port} unreachable after 1 s")
