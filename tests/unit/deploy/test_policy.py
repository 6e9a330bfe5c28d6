"""The policy scan: checkov's Kubernetes checks on the chart as rendered, every finding either fixed or justified in
deploy/helm/policy-exceptions.yaml (`make policy`).

checkov lives in a virtualenv of its own (.venv/policy, deploy/helm/policy-requirements.txt): its pins conflict with
the platform's. It is taken from $CHECKOV, then .venv/policy, then PATH; a missing one fails the test with the
command that installs it (this gate must not skip silently). One checkov run covers every rendering below.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.test_manifests_valid import CHART_DIR, REPO_ROOT, run, tool

EXCEPTIONS_FILE = REPO_ROOT / "deploy/helm/policy-exceptions.yaml"
DIGEST = "sha256:" + "ab" * 32
# What is scanned: the chart as users get it, as kind gets it, and with every optional part on.
RENDERINGS = {
    "default": [],
    "kind": ["-f", str(CHART_DIR / "values-kind.yaml")],
    "full": [
        "--set",
        "debezium.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        f"image.digest={DIGEST}",
    ],
}
# Scanned too, never accepted: proves the gate sees a real regression (a container allowed to escalate).
INSECURE = ["--set", "containerSecurityContext.allowPrivilegeEscalation=true"]


@dataclass(frozen=True)
class Finding:
    rendering: str
    check: str
    name: str  # what checkov calls the check
    object: str  # Kind/name

    def __str__(self) -> str:
        return f"{self.rendering}: {self.check} {self.object} ({self.name})"


def checkov() -> Path:
    if env := os.environ.get("CHECKOV"):
        return Path(env)
    own = REPO_ROOT / ".venv/policy/bin/checkov"
    if own.exists():
        return own
    if on_path := shutil.which("checkov"):
        return Path(on_path)
    pytest.fail("checkov not found: `make policy` installs it into .venv/policy (deploy/helm/policy-requirements.txt)")


def exceptions() -> list[dict[str, Any]]:
    return yaml.safe_load(EXCEPTIONS_FILE.read_text())


def accepted(finding: Finding, entries: list[dict[str, Any]]) -> bool:
    return any(
        entry["check"] == finding.check and any(fnmatch.fnmatchcase(finding.object, p) for p in entry["objects"])
        for entry in entries
    )


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Finding], dict[str, Any]]:
    """Every failed check of every rendering (and of the insecure one), and checkov's summary."""
    folder = tmp_path_factory.mktemp("rendered")
    for rendering, values in {**RENDERINGS, "insecure": INSECURE}.items():
        manifest = run(tool("helm"), "template", "lp", CHART_DIR, "--namespace", "data", *values)
        (folder / f"{rendering}.yaml").write_text(manifest)
    completed = subprocess.run(
        [str(checkov()), "-d", str(folder), "--framework", "kubernetes", "-o", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert completed.returncode in (0, 1), completed.stderr  # 1: there are failed checks
    report = json.loads(completed.stdout)
    (report,) = report if isinstance(report, list) else [report]
    findings = []
    for failed in report["results"]["failed_checks"]:
        kind, _namespace, name = failed["resource"].split(".", 2)
        rendering = Path(failed["file_path"]).stem
        findings.append(Finding(rendering, failed["check_id"], failed["check_name"], f"{kind}/{name}"))
    return findings, report["summary"]


def test_checkov_scanned_every_rendering(scan: tuple[list[Finding], dict[str, Any]]) -> None:
    _, summary = scan
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100 and summary["resource_count"] > 4 * 30  # four renderings of the whole chart


def test_every_finding_is_fixed_or_justified(scan: tuple[list[Finding], dict[str, Any]]) -> None:
    findings, _ = scan
    entries = exceptions()
    unjustified = [str(f) for f in findings if f.rendering in RENDERINGS and not accepted(f, entries)]
    assert not unjustified, "fix these or justify them in deploy/helm/policy-exceptions.yaml:\n" + "\n".join(
        unjustified
    )


def test_no_exception_is_stale(scan: tuple[list[Finding], dict[str, Any]]) -> None:
    findings, _ = scan
    scanned = [f for f in findings if f.rendering in RENDERINGS]
    for entry in exceptions():
        for pattern in entry["objects"]:
            matched = [f for f in scanned if f.check == entry["check"] and fnmatch.fnmatchcase(f.object, pattern)]
            assert matched, f"{entry['check']} {pattern}: no such finding any more; remove it from the exceptions"


def test_exceptions_say_why() -> None:
    for entry in exceptions():
        assert set(entry) == {"check", "objects", "why"}, entry
        assert entry["check"].startswith("CKV_K8S_") and entry["objects"]
        assert len(entry["why"].split()) >= 10, f"{entry['check']}: say why in a sentence"


def test_the_gate_catches_a_regression(scan: tuple[list[Finding], dict[str, Any]]) -> None:
    findings, _ = scan
    insecure = [f for f in findings if f.rendering == "insecure" and not accepted(f, exceptions())]
    assert {f.check for f in insecure} == {"CKV_K8S_20"}  # allowPrivilegeEscalation, on every platform container
    assert "Deployment/lp-lambda-pipeline-generator" in {f.object for f in insecure}


def test_an_image_digest_pins_the_platform_image(scan: tuple[list[Finding], dict[str, Any]]) -> None:
    findings, _ = scan
    unpinned = {f.object for f in findings if f.rendering == "full" and f.check == "CKV_K8S_43"}
    assert unpinned == {"Deployment/lp-lambda-pipeline-debezium"}  # Debezium's own image keeps its version tag
    rendered = run(tool("helm"), "template", "lp", CHART_DIR, "--set", f"image.digest={DIGEST}")
    images = {
        container["image"]
        for document in yaml.safe_load_all(rendered)
        if document and document["kind"] == "Deployment"
        for container in document["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"ghcr.io/lambda-pipeline/lambda-pipeline@{DIGEST}"}
