import json
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
    health = Health(stall_after_s=0.5)
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
    import time

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
