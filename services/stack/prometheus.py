"""Prometheus in the local stack: Debian's `prometheus` binary, a generated config, the chart's alert rules.

It scrapes every service the run registers (``register_targets``: file-based discovery, so targets come and
go without a restart) and itself, every 2 s, and evaluates the same rules file the chart renders as its
PrometheusRule. A machine without the binary runs the stack without it (the stack says so).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from services.kit.paths import repo_root
from services.stack.components import Component, tcp_open
from services.stack.settings import HOST

RULES_FILE = repo_root() / "deploy" / "helm" / "lambda-pipeline" / "files" / "prometheus" / "lambda-pipeline.rules.yaml"
# Short: a demo run lasts a minute or two, and each scrape of a service costs it little.
SCRAPE_INTERVAL_S = 2
SERVICES_JOB = "lambda-pipeline"


class Prometheus(Component):
    name = "prometheus"
    port_fields = ("prometheus_port",)

    @staticmethod
    def binary() -> str | None:
        """The prometheus binary (Debian's package puts it in /usr/bin), or None if it is not installed."""
        return shutil.which("prometheus")

    @property
    def home(self) -> Path:
        return self.state_dir / "prometheus"

    @property
    def config_path(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def targets_file(self) -> Path:
        return self.home / "targets" / "services.json"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.register_targets({})
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")  # JSON is YAML

    def config(self) -> dict[str, Any]:
        interval = f"{SCRAPE_INTERVAL_S}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(RULES_FILE)],
            "scrape_configs": [
                {"job_name": "prometheus", "static_configs": [{"targets": [f"{HOST}:{self.port}"]}]},
                {
                    "job_name": SERVICES_JOB,
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": interval}],
                },
            ],
        }

    def command(self) -> list[str]:
        binary = self.binary() or "prometheus"
        return [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.home / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={HOST}:{self.port}",
            "--log.level=warn",
        ]

    def probe(self) -> None:
        if not tcp_open(self.port):
            raise ConnectionError(f"{HOST}:{self.port} does not accept connections")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            if response.status != 200:
                raise RuntimeError(f"/-/ready answered {response.status}")

    # -- targets and queries -------------------------------------------------------------------------

    def register_targets(self, http_ports: dict[str, int]) -> None:
        """Scrape these services' /metrics (name -> HTTP port), replacing the ones registered before."""
        groups = [
            {"targets": [f"{HOST}:{port}"], "labels": {"service": name}} for name, port in sorted(http_ports.items())
        ]
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.targets_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(groups, indent=2) + "\n")
        tmp.replace(self.targets_file)  # Prometheus never reads half a file

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a Prometheus HTTP API answer (``/api/v1/<path>``)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
            answer = json.loads(response.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus /api/v1/{path}: {answer}")
        return answer["data"]

    def services_ever_up(self, window_s: float) -> dict[str, bool]:
        """Per registered service: whether a scrape of it succeeded within the last ``window_s`` seconds."""
        targets = self.api("targets", state="active")["activeTargets"]
        names = {t["labels"]["service"] for t in targets if t["labels"].get("job") == SERVICES_JOB}
        window = f"{max(int(window_s), SCRAPE_INTERVAL_S)}s"
        result = self.api("query", query=f'max by (service) (max_over_time(up{{job="{SERVICES_JOB}"}}[{window}]))')
        up = {row["metric"].get("service"): float(row["value"][1]) == 1.0 for row in result["result"]}
        return {name: up.get(name, False) for name in sorted(names)}

    def wait_scraped(self, services: list[str], window_s: float, timeout: float = 10.0) -> dict[str, bool]:
        """``services_ever_up`` once each of ``services`` was scraped successfully, or when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.services_ever_up(window_s + (timeout - (deadline - time.monotonic())))
            if all(seen.get(name) for name in services) or time.monotonic() >= deadline:
                return seen
            time.sleep(0.5)

    def alerts_seen(self, window_s: float) -> dict[str, str]:
        """Alert name -> "firing" or "pending": every alert of the rules active within the last ``window_s`` s."""
        window = f"{max(int(window_s), SCRAPE_INTERVAL_S)}s"
        result = self.api("query", query=f"max by (alertname, alertstate) (max_over_time(ALERTS[{window}]))")
        states: dict[str, str] = {}
        for row in result["result"]:
            name, state = row["metric"]["alertname"], row["metric"]["alertstate"]
            if states.get(name) != "firing":
                states[name] = state
        for alert in self.api("alerts")["alerts"]:  # active now, also if not yet in a stored ALERTS sample
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return dict(sorted(states.items()))

    def rule_groups(self) -> list[str]:
        return [group["name"] for group in self.api("rules")["groups"]]

    def run_report(self, window_s: float, long_running: list[str]) -> dict[str, Any]:
        """What the run summary shows: each service's scrape result, the alerts seen, where to look."""
        targets = self.wait_scraped(long_running, window_s)
        return {"url": self.url, "targets_ever_up": targets, "alerts": self.alerts_seen(window_s + 10)}


__all__ = ["RULES_FILE", "SCRAPE_INTERVAL_S", "SERVICES_JOB", "Prometheus"]
