"""Packages that only the `local` extra installs, for the few code paths that run only locally.

The container image installs the main dependencies alone (docs/deploy.md, "The image"). A local-mode path
(the CDC service's embedded Debezium engine, which Debezium Server replaces in Kubernetes) imports its packages
through `import_local`, inside the function that needs them, so every module still imports without the extra
and a production image pointed at local mode fails with one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

LOCAL_EXTRA_INSTALL = "pip install 'lambda-pipeline[local]'"


class LocalExtraMissing(RuntimeError):
    """A local-mode path ran where the `local` extra is not installed (the container image)."""


def import_local(module: str, needed_for: str) -> ModuleType:
    """`module` imported, or LocalExtraMissing saying that `needed_for` needs the local extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise  # something inside the package is missing: not the extra's absence
        raise LocalExtraMissing(
            f"{needed_for} needs {module.split('.')[0]}, which only the local extra installs ({LOCAL_EXTRA_INSTALL})"
        ) from None
