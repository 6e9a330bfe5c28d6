import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.kit.health import Health, HealthServer


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def served():
    registry = CollectorRegistry()
    Counter("lp_demo_records", "demo", registry=registry).inc(3)
    Counter("lp_demo_other", "demo", registry=registry).inc()
    health = Health(progress_budget_s=0.5, probe_timeout_s=0.3)
    server = HealthServer(health, 0, registry).start()
    yield health, server.port
    server.stop()


def test_not_ready_until_started_then_ready(served):
    health, port = served
    status, body = get(port, "/readyz")
    assert status == 503 and json.loads(body)["reason"] == "starting"
    health.set_ready(True)
    assert get(port, "/readyz")[0] == 200


def test_failing_check_makes_unready(served):
    health, port = served
    health.set_ready(True)
    health.add_check("kafka", lambda: "broker unreachable")
    status, body = get(port, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == {"kafka": "broker unreachable"}


def test_liveness_follows_the_loop_heartbeat(served):
    health, port = served
    health.beat()
    assert get(port, "/healthz")[0] == 200
    time.sleep(0.6)
    assert get(port, "/healthz")[0] == 503
    health.beat()
    assert get(port, "/healthz")[0] == 200


def test_metrics_exposition(served):
    _, port = served
    status, body = get(port, "/metrics")
    assert status == 200
    assert b"lp_demo_records_total 3.0" in body
    assert get(port, "/nope")[0] == 404


def test_metrics_can_be_restricted_to_named_ones(served):
    _, port = served
    status, body = get(port, "/metrics?name[]=lp_demo_records_total")
    assert status == 200
    assert b"lp_demo_records_total 3.0" in body and b"lp_demo_other" not in body
    assert b"lp_demo_other_total 1.0" in get(port, "/metrics")[1]


def test_a_hung_check_makes_unready_within_the_probe_timeout_and_is_not_started_twice(served):
    health, port = served
    health.set_ready(True)
    release = threading.Event()
    calls = []

    def hangs() -> str | None:
        calls.append(1)
        release.wait(10)
        return None

    health.add_check("warehouse", hangs)
    started = time.monotonic()
    status, body = get(port, "/readyz")
    assert status == 503 and time.monotonic() - started < 2
    assert "no answer within 0.3s" in json.loads(body)["failing"]["warehouse"]
    assert get(port, "/readyz")[0] == 503
    assert len(calls) == 1  # the hung one is waited for, not duplicated
    release.set()
    time.sleep(0.05)
    assert get(port, "/readyz")[0] == 200


def test_liveness_fails_when_a_dependency_fails_for_longer_than_the_budget(served):
    health, port = served
    health.set_ready(True)
    health.dependency_down("snowflake", "ConnectionError: refused")
    status, body = get(port, "/readyz")
    assert status == 503 and json.loads(body)["failing"] == {"snowflake": "down: ConnectionError: refused"}
    health.beat()
    assert get(port, "/healthz")[0] == 200  # down, but not for longer than the budget yet
    time.sleep(0.3)
    health.beat()
    time.sleep(0.3)
    health.beat()  # the loop keeps turning: only the dependency is stuck
    status, body = get(port, "/healthz")
    assert status == 503 and json.loads(body)["reason"].startswith("a dependency has been failing for")
    health.dependency_up("snowflake")
    assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200


def test_starting_or_shutting_down_is_not_a_dependency_failure(served):
    health, port = served
    health.add_check("store", lambda: "refused")
    health.set_ready(False, "shutting down")
    time.sleep(0.3)
    health.beat()
    time.sleep(0.3)
    health.beat()
    assert get(port, "/readyz")[0] == 503 and get(port, "/healthz")[0] == 200


def test_health_budgets_come_from_the_environment(monkeypatch):
    from services.kit.config import ConfigError, load_settings
    from services.kit.health import HealthSettings

    monkeypatch.setenv("HEALTH_PROGRESS_BUDGET_S", "7")
    monkeypatch.setenv("HEALTH_PROBE_TIMEOUT_S", "1.5")
    health = Health.from_settings(load_settings(HealthSettings))
    assert (health.progress_budget_s, health.probe_timeout_s) == (7.0, 1.5)
    monkeypatch.setenv("HEALTH_PROGRESS_BUDGET_S", "0")
    with pytest.raises(ConfigError, match="HEALTH_PROGRESS_BUDGET_S"):
        load_settings(HealthSettings)
