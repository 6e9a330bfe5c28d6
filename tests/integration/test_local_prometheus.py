"""The stack's Prometheus (Debian's binary) loads the chart's alert rules and scrapes a running service."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from services.kit.kafka import create_topics
from services.stack import LocalStack, StackSettings
from services.stack.prometheus import RULES_FILE, SCRAPE_INTERVAL_S
from services.testing.ingest import IngestProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary (make promtool installs it)"),
]


def test_prometheus_loads_the_rules_and_scrapes_a_running_service(stack_state_dir: Path, tmp_path: Path) -> None:
    # Broker (the ingest service needs one) and Prometheus only: the lightest stack a service runs against.
    stack = LocalStack(StackSettings.with_free_ports(state_dir=stack_state_dir), only=["broker", "prometheus"])
    stack.start()
    try:
        prometheus = stack.prometheus
        assert stack.prometheus_running
        expected_groups = [group["name"] for group in yaml.safe_load(RULES_FILE.read_text())["groups"]]
        assert sorted(prometheus.rule_groups()) == sorted(expected_groups)
        rules = [rule["name"] for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert "HighIngestionLag" in rules

        topic = "test.prometheus.events"
        create_topics({"bootstrap.servers": stack.bootstrap_servers}, {topic: 1})
        with IngestProcess(stack.env(), topic=topic, log_path=tmp_path / "ingest.log") as ingest:
            t0 = time.monotonic()
            prometheus.register_targets({"ingest": ingest.http_port})
            seen = prometheus.wait_scraped(["ingest"], window_s=1, timeout=6 * SCRAPE_INTERVAL_S)
            assert seen == {"ingest": True}, prometheus.api("targets")
            # The scraped samples are the service's own metrics, labelled with the service's name.
            result = prometheus.api("query", query='count by (service) ({service="ingest", __name__=~"lp_.+"})')
            assert result["result"] and result["result"][0]["metric"] == {"service": "ingest"}
            report = prometheus.run_report(time.monotonic() - t0, ["ingest"])
            assert report["targets_ever_up"] == {"ingest": True}
            assert isinstance(report["alerts"], dict)
        status = {row["name"]: row for row in stack.status()}
        assert status["prometheus"]["running"] and status["prometheus"]["port"] == stack.settings.prometheus_port
    finally:
        stack.stop()
    assert not stack.prometheus.is_running()
    assert (stack_state_dir / "prometheus" / "data").is_dir()  # its storage lives under the state dir
