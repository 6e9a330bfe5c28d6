"""`python -m services.ingest.codegen`: regenerate the committed Python code of the ingest API from `proto/`.

protoc names generated modules after the proto's path (`lambda_pipeline/ingest/v1/ingest_pb2.py`), and the gRPC
stubs import their messages by that path. We generate into a scratch folder, rewrite that one import to the
package the code is committed in (`services.ingest.v1`) and copy the files over. `--check` compares instead of
writing (the unit tests do the same), so a proto edit without regeneration fails CI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from services.kit.exits import ExitCode
from services.kit.paths import repo_root

PROTO_PACKAGE_PATH = Path("lambda_pipeline/ingest/v1")
PROTO_FILE = PROTO_PACKAGE_PATH / "ingest.proto"
PYTHON_PACKAGE = "services.ingest.v1"
GENERATED = ("ingest_pb2.py", "ingest_pb2.pyi", "ingest_pb2_grpc.py")
REGENERATE_HINT = "run `python -m services.ingest.codegen`"


def proto_root() -> Path:
    return repo_root() / "proto"


def output_dir() -> Path:
    return repo_root() / "services" / "ingest" / "v1"


def generate(proto_dir: Path | None = None) -> dict[str, str]:
    """Run protoc (grpcio-tools) on the ingest proto; return {file name: contents} of the Python modules."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    proto_dir = proto_dir or proto_root()
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/timestamp.proto and friends
    with tempfile.TemporaryDirectory(prefix="lp-codegen-") as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / PROTO_FILE}")
        produced = Path(scratch) / PROTO_PACKAGE_PATH
        files = {name: (produced / name).read_text() for name in GENERATED}
    proto_module = ".".join(PROTO_PACKAGE_PATH.parts)
    files["ingest_pb2_grpc.py"] = files["ingest_pb2_grpc.py"].replace(
        f"from {proto_module} import ingest_pb2", f"from {PYTHON_PACKAGE} import ingest_pb2"
    )
    return files


def stale_files(directory: Path | None = None) -> list[str]:
    """Names of generated files in `directory` that differ from what the proto generates now."""
    directory = directory or output_dir()
    stale = []
    for name, text in generate().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale


def write(directory: Path | None = None) -> list[Path]:
    directory = directory or output_dir()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingest.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files are out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"generated ingest API code is out of date ({', '.join(stale)}): {REGENERATE_HINT}", file=sys.stderr)
            return ExitCode.FAILED
        print("generated ingest API code is up to date")
        return ExitCode.OK
    for path in write():
        print(f"wrote {path.relative_to(repo_root())}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
