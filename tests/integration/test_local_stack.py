"""The local stack really runs: each stand-in answers its real client, and nothing outlives a stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from services.stack import ComponentError, LocalStack, PortInUseError, StackSettings
from services.stack.components import group_members, process_alive

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the connector's pyarrow-version warning
    import snowflake.connector

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS",
    "POSTGRES_DSN",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "ICEBERG_REST_URI",
    "SNOWFLAKE_ACCOUNT",
    "SNOWFLAKE_USER",
    "SNOWFLAKE_PASSWORD",
    "SNOWFLAKE_HOST",
    "SNOWFLAKE_PORT",
    "SNOWFLAKE_PROTOCOL",
    "SNOWFLAKE_DATABASE",
}


def _gone(pids: list[int]) -> bool:
    return not any(process_alive(pid) or group_members(pid) for pid in pids)


def _wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pids):
            return True
        time.sleep(0.1)
    return _gone(pids)


def test_env_names_and_attributes(stack: LocalStack) -> None:
    env = stack.env()
    assert set(env) == EXPECTED_ENV
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == stack.bootstrap_servers == f"127.0.0.1:{stack.settings.broker_port}"
    assert env["POSTGRES_DSN"] == stack.postgres_dsn
    assert env["S3_ENDPOINT_URL"] == stack.s3_endpoint
    assert env["SNOWFLAKE_PORT"] == str(stack.snowflake_port)
    assert env["SNOWFLAKE_PROTOCOL"] == "http"
    state = json.loads((stack.state_dir / "stack.json").read_text())
    assert state["env"] == env
    assert {name: rec["pid"] for name, rec in state["components"].items()} == {
        comp.name: comp.pid for comp in stack.components
    }
    stack.check()  # all alive


def test_kafka_topic_produce_consume_with_header(stack: LocalStack) -> None:
    topic = f"lp-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)]).values():
        future.result(timeout=10)
    assert len(admin.list_topics(topic, timeout=5).topics[topic].partitions) == 4

    producer = Producer({"bootstrap.servers": stack.bootstrap_servers})
    producer.produce(topic, key=b"k1", value=b"hello", headers=[("traceparent", b"00-abc-def-01")])
    assert producer.flush(10) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
            # Tansu holds JoinGroup for session.timeout/2: keep it short or the join takes 20+ s.
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        msg = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
        assert msg is not None and msg.error() is None, "no record consumed"
        assert (msg.key(), msg.value()) == (b"k1", b"hello")
        assert msg.headers() == [("traceparent", b"00-abc-def-01")]
    finally:
        consumer.close()


def test_postgres_sql_round_trip_and_logical_wal(stack: LocalStack) -> None:
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SELECT current_database()").fetchone() == ("shop",)
        conn.execute("CREATE TABLE IF NOT EXISTS lp_probe (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO lp_probe VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET name = 'a'")
        assert conn.execute("SELECT name FROM lp_probe WHERE id = 1").fetchone() == ("a",)


def test_s3_put_get_and_iceberg_catalog(stack: LocalStack) -> None:
    s3 = stack.s3_client()
    assert stack.s3_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.put_object(Bucket=stack.s3_bucket, Key="probe/hello.txt", Body=b"hello lakehouse")
    body = s3.get_object(Bucket=stack.s3_bucket, Key="probe/hello.txt")["Body"].read()
    assert body == b"hello lakehouse"
    with urllib.request.urlopen(f"{stack.iceberg_rest_uri}/v1/config", timeout=5) as resp:
        assert resp.status == 200


def test_snowflake_select_and_table(stack: LocalStack) -> None:
    env = stack.env()
    with snowflake.connector.connect(
        account=env["SNOWFLAKE_ACCOUNT"],
        user=env["SNOWFLAKE_USER"],
        password=env["SNOWFLAKE_PASSWORD"],
        host=env["SNOWFLAKE_HOST"],
        port=int(env["SNOWFLAKE_PORT"]),
        protocol=env["SNOWFLAKE_PROTOCOL"],
        database=env["SNOWFLAKE_DATABASE"],
        schema="PUBLIC",
    ) as conn:
        cur = conn.cursor()
        assert cur.execute("select 1").fetchone() == (1,)
        cur.execute("create or replace table orders (id int, amount number(10,2))")
        cur.execute("insert into orders values (1, 9.50), (2, 0.50)")
        assert cur.execute("select count(*), sum(amount) from orders").fetchone()[0] == 2


def test_dead_component_is_reported_and_stop_cleans_up(stack_state_dir: Path) -> None:
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    local = LocalStack(settings, only=["broker", "postgres"])
    local.start()
    try:
        pids = [comp.pid for comp in local.components]
        assert all(pids)
        with psycopg.connect(local.postgres_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int)")
        postmaster = local.postgres.pid
        assert postmaster is not None
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ComponentError) as info:
            local.check()
        message = str(info.value)
        assert "postgres" in message
        assert str(local.postgres.log_path) in message
    finally:
        local.stop()
    assert _wait_gone(pids), "processes left after stop()"
    assert not (settings.state_dir / "stack.json").exists()

    # Same state dir again: no second initdb, the data survived the crash.
    with LocalStack(settings, only=["postgres"]) as again, psycopg.connect(again.postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


def test_port_in_use_names_port_and_env_var(stack_state_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        settings = StackSettings.with_free_ports(state_dir=stack_state_dir, broker_port=port)
        local = LocalStack(settings)
        with pytest.raises(PortInUseError) as info:
            local.start()
    assert str(port) in str(info.value)
    assert "LP_BROKER_PORT" in str(info.value)
    assert all(comp.pid is None for comp in local.components)
    assert not (settings.state_dir / "stack.json").exists()


def test_stale_stack_json_does_not_block_start(stack_state_dir: Path) -> None:
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"detached": True, "settings": {}, "components": {"broker": {"pid": dead.pid, "create_time": 1.0}}}
    (settings.state_dir / "stack.json").write_text(json.dumps(stale))
    with LocalStack(settings, only=["broker"]) as local:
        local.check()
        assert json.loads((settings.state_dir / "stack.json").read_text())["components"]["broker"]["pid"] == (
            local.broker.pid
        )


def _cli(state_dir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.stack", "--state-dir", str(state_dir), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_detached_up_status_down(stack_state_dir: Path) -> None:
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    env = dict(os.environ)
    env.update({StackSettings.env_var(field): str(port) for field, port in settings.ports().items()})
    env.pop(StackSettings.env_var("seaweed_admin_grpc_port"))  # derived, not a setting
    state_dir = settings.state_dir

    up = _cli(state_dir, "up", env=env)
    assert up.returncode == 0, up.stderr
    assert f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{settings.broker_port}" in up.stdout
    record = json.loads((state_dir / "stack.json").read_text())
    pids = [rec["pid"] for rec in record["components"].values()]
    # Prometheus joins the four stand-ins where its binary is installed.
    expected = 5 if shutil.which("prometheus") else 4
    try:
        assert len(pids) == expected
        assert all(process_alive(pid) for pid in pids), "detached components must outlive `up`"

        status = _cli(state_dir, "status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" running ") == expected
        if expected == 5:
            assert f"port {settings.prometheus_port}" in status.stdout
            assert f"Prometheus: http://127.0.0.1:{settings.prometheus_port}" in up.stdout

        again = _cli(state_dir, "up", env=env)
        assert again.returncode == 0
        assert "already up" in again.stdout
    finally:
        down = _cli(state_dir, "down", env=env)
    assert down.returncode == 0, down.stderr
    assert _wait_gone(pids), "processes left after `down`"
    assert not (state_dir / "stack.json").exists()

    assert _cli(state_dir, "down", env=env).returncode == 0  # nothing running is fine
    assert _cli(state_dir, "status", env=env).returncode == 3


def test_postgres_refuses_a_foreign_data_dir(stack_state_dir: Path) -> None:
    settings = StackSettings.with_free_ports(state_dir=stack_state_dir)
    (stack_state_dir / "postgres").mkdir()
    (stack_state_dir / "postgres" / "notes.txt").write_text("not a cluster")
    with pytest.raises(ComponentError) as info:
        LocalStack(settings, only=["postgres"]).start()
    assert "no PG_VERSION" in str(info.value)
    assert (stack_state_dir / "postgres" / "notes.txt").exists()
