"""Settings of the local stack: defaults, LP_* overrides, free-port picking, derived endpoints."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from services.stack import LocalStack, StackSettings
from services.stack.cli import main as cli_main
from services.stack.prometheus import RULES_FILE, SERVICES_JOB, Prometheus
from services.stack.settings import (
    DEFAULT_STATE_DIR,
    SEAWEED_GRPC_OFFSET,
    pick_free_port_pair,
    pick_free_ports,
    port_is_free,
)


@pytest.fixture(autouse=True)
def _no_lp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LP_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = StackSettings()
    assert s.state_dir == DEFAULT_STATE_DIR
    assert DEFAULT_STATE_DIR.name == ".local"
    assert (s.broker_port, s.postgres_port, s.s3_port, s.snowflake_port) == (19092, 15432, 18333, 18080)
    assert s.seaweed_admin_grpc_port == s.seaweed_admin_port + SEAWEED_GRPC_OFFSET
    ports = s.ports()
    assert len(set(ports.values())) == len(ports), "default ports must not collide"
    assert "seaweed_admin_grpc_port" in ports


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LP_BROKER_PORT", "29092")
    monkeypatch.setenv("LP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-for-the-stack")  # only LP_* is read
    s = StackSettings()
    assert s.broker_port == 29092
    assert s.state_dir == tmp_path
    assert s.aws_access_key_id == "lpadmin"


def test_relative_state_dir_becomes_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LP_STATE_DIR", "rel/state")
    assert StackSettings().state_dir == tmp_path.resolve() / "rel" / "state"


def test_env_var_names() -> None:
    assert StackSettings.env_var("broker_port") == "LP_BROKER_PORT"
    assert StackSettings.env_var("seaweed_filer_grpc_port") == "LP_SEAWEED_FILER_GRPC_PORT"
    assert "broker_port" in StackSettings.port_fields()
    assert all(name.endswith("_port") for name in StackSettings.port_fields())


def test_with_free_ports_distinct_free_and_overridable(tmp_path: Path) -> None:
    s = StackSettings.with_free_ports(state_dir=tmp_path, snowflake_port=23456)
    ports = s.ports()
    assert s.state_dir == tmp_path
    assert s.snowflake_port == 23456
    assert len(set(ports.values())) == len(ports)
    assert s.seaweed_admin_grpc_port == s.seaweed_admin_port + SEAWEED_GRPC_OFFSET <= 65535
    busy = [p for name, p in ports.items() if name != "snowflake_port" and not port_is_free(p)]
    assert not busy


def test_with_free_ports_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_BROKER_PORT", "1")
    monkeypatch.setenv("LP_S3_BUCKET", "from-env")
    s = StackSettings.with_free_ports()
    assert s.broker_port != 1  # picked ports win over the environment ...
    assert s.s3_bucket == "from-env"  # ... other settings still come from it


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)


def test_pick_free_ports_and_pairs() -> None:
    ports = pick_free_ports(10)
    assert len(set(ports)) == 10
    port = pick_free_port_pair(SEAWEED_GRPC_OFFSET, exclude=set(ports))
    assert port not in ports and port + SEAWEED_GRPC_OFFSET not in ports
    assert port_is_free(port) and port_is_free(port + SEAWEED_GRPC_OFFSET)


def test_stack_env_from_settings_only(tmp_path: Path) -> None:
    s = StackSettings(state_dir=tmp_path, broker_port=1111, postgres_port=2222, snowflake_port=3333)
    stack = LocalStack(s)
    env = stack.env()
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:1111"
    assert env["POSTGRES_DSN"] == "postgresql://postgres@127.0.0.1:2222/shop"
    assert env["S3_ENDPOINT_URL"] == f"http://127.0.0.1:{s.s3_port}"
    assert env["ICEBERG_REST_URI"] == f"http://127.0.0.1:{s.iceberg_port}"
    assert env["SNOWFLAKE_PORT"] == "3333"
    assert env["SNOWFLAKE_DATABASE"] == "LAMBDA_PIPELINE"
    assert env["AWS_REGION"] == "us-east-1"
    assert stack.snowflake_connect_kwargs()["port"] == 3333
    with_prometheus = ["prometheus"] if shutil.which("prometheus") else []
    assert [c.name for c in stack.components] == ["broker", "postgres", "s3", "snowflake", *with_prometheus]
    assert [c.name for c in LocalStack(s, only=["s3", "broker"]).components] == ["broker", "s3"]
    with pytest.raises(ValueError):
        LocalStack(s, only=["kafka"])


def test_cli_env_and_status_without_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--state-dir", str(tmp_path), "env"]) == 0
    out = capsys.readouterr().out
    assert "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092" in out
    assert cli_main(["status", "--state-dir", str(tmp_path)]) == 3
    assert cli_main(["down", "--state-dir", str(tmp_path)]) == 0


def test_stack_without_a_prometheus_binary_runs_without_it_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus on it
    stack = LocalStack(StackSettings(state_dir=tmp_path))
    assert [c.name for c in stack.components] == ["broker", "postgres", "s3", "snowflake"]
    assert not stack.prometheus_running
    assert "no prometheus binary" in stack.skipped["prometheus"]


def test_prometheus_config_scrapes_registered_services_and_loads_the_charts_rules(tmp_path: Path) -> None:
    prometheus = Prometheus(StackSettings(state_dir=tmp_path, prometheus_port=4444))
    prometheus._prepare()
    config = yaml.safe_load(prometheus.config_path.read_text())
    assert config["rule_files"] == [str(RULES_FILE)]
    assert RULES_FILE.is_file()
    assert config["global"]["scrape_interval"] == "2s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:4444"]}]
    assert jobs[SERVICES_JOB]["file_sd_configs"][0]["files"] == [str(prometheus.targets_file)]
    assert json.loads(prometheus.targets_file.read_text()) == []
    prometheus.register_targets({"validator": 5001, "cdc": 5002})
    assert json.loads(prometheus.targets_file.read_text()) == [
        {"targets": ["127.0.0.1:5002"], "labels": {"service": "cdc"}},
        {"targets": ["127.0.0.1:5001"], "labels": {"service": "validator"}},
    ]
    assert f"--storage.tsdb.path={tmp_path / 'prometheus' / 'data'}" in prometheus.command()
