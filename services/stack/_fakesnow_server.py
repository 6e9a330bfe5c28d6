"""Run fakesnow's Snowflake HTTP server in the foreground, optionally persisting databases to disk.

``fakesnow -s`` (0.12.1) keeps every database in memory and ignores ``--db_path`` in server mode. The
server module picks its shared DuckDB instance from the module global ``shared_fs`` at each login, so
replacing that global with one that has a ``db_path`` makes ``CREATE DATABASE`` (and the database named at
connect time) a DuckDB file ``<db-path>/<NAME>.db`` that survives restarts.

Run as a plain script (not ``-m``) so it needs nothing from this repository on ``sys.path``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db-path", type=Path, default=None, help="folder for DuckDB files (default: memory)")
    args = parser.parse_args()

    # snowflake-connector warns about the (newer) pyarrow on import; it does not matter to the server.
    warnings.filterwarnings("ignore", message=".*incompatible version of 'pyarrow'.*")

    import fakesnow.server
    import uvicorn
    from fakesnow.instance import FakeSnow

    if args.db_path is not None:
        args.db_path.mkdir(parents=True, exist_ok=True)
        fakesnow.server.shared_fs = FakeSnow(db_path=args.db_path)

    # uvicorn installs SIGINT/SIGTERM handlers and shuts down gracefully on either.
    uvicorn.run(fakesnow.server.app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
