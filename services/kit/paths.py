"""Where the repository's shared files live, in a checkout and in the container image."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The folder holding `schemas/` and `deploy/`.

    `LP_REPO_ROOT` wins so a container (or an installed wheel) can point at copied files; otherwise we walk up
    from this file, which works for an editable install and a plain checkout alike.
    """
    if env := os.environ.get("LP_REPO_ROOT"):
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "schemas" / "avro").is_dir():
            return parent
    raise RuntimeError("cannot find the repository root (no schemas/avro above services/kit); set LP_REPO_ROOT")


def avro_schema_dir() -> Path:
    return Path(os.environ.get("LP_AVRO_SCHEMA_DIR", repo_root() / "schemas" / "avro"))
