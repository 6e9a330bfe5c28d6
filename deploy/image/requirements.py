"""Print one dependency group of pyproject.toml, a requirement a line, for `pip install -c constraints.txt -r -`.

    python deploy/image/requirements.py main     # [project] dependencies: what the runtime image installs
    python deploy/image/requirements.py local    # an optional extra

The Dockerfile installs the dependencies from this list before it copies any code (so a code edit keeps that
layer), and tests/unit/test_runtime_dependencies.py builds its venv without the local extra the same way.
Standard library only: it runs in the bare base image.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, group: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"] if group == "main" else project["optional-dependencies"][group])


if __name__ == "__main__":
    pyproject = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("pyproject.toml")
    print("\n".join(requirements(pyproject, sys.argv[1] if len(sys.argv) > 1 else "main")))
