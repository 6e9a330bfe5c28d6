"""schema-check: the working tree's .avsc files against a git revision, in a throwaway repository."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.declarations.__main__ import main
from services.declarations.manifests import sync_manifests
from services.declarations.schema_check import check_schemas, default_revision

V1: dict[str, Any] = {
    "type": "record",
    "name": "Thing",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}
V2_OPTIONAL = {**V1, "fields": [*V1["fields"], {"name": "note", "type": ["null", "string"], "default": None}]}
V2_REQUIRED = {**V1, "fields": [*V1["fields"], {"name": "note", "type": "string"}]}
V2_RETYPED = {**V1, "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "string"}]}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def write_schema(repo: Path, schema: dict[str, Any], name: str = "thing") -> None:
    (repo / "schemas/avro" / f"{name}.avsc").write_text(json.dumps(schema, indent=2))


def set_mode(repo: Path, mode: str, name: str = "thing") -> None:
    sync_manifests(repo)
    cr = repo / "deploy/k8s/schemas" / f"{name}.yaml"
    cr.write_text(re.sub(r"compatibility: \w+", f"compatibility: {mode}", cr.read_text()))


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "schemas/avro").mkdir(parents=True)
    (tmp_path / "deploy/k8s").mkdir(parents=True)
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "test@example.invalid")
    git(tmp_path, "config", "user.name", "test")
    git(tmp_path, "config", "commit.gpgsign", "false")
    write_schema(tmp_path, V1)
    sync_manifests(tmp_path)
    commit(tmp_path, "v1")
    return tmp_path


def statuses(repo: Path, against: str | None = None) -> dict[str, str]:
    report = check_schemas(repo, against)
    return {check.path: check.status for check in report.files}


def test_unchanged_and_compatible(repo: Path) -> None:
    assert statuses(repo) == {"schemas/avro/thing.avsc": "unchanged"}
    write_schema(repo, V2_OPTIONAL)
    assert statuses(repo) == {"schemas/avro/thing.avsc": "compatible"}


def test_incompatible_change_lists_reasons(repo: Path) -> None:
    write_schema(repo, V2_RETYPED)
    report = check_schemas(repo)
    assert not report.ok
    (check,) = report.files
    assert check.status == "incompatible" and check.mode == "BACKWARD"
    assert [p.path for p in check.problems] == ["Thing.n"]
    rendered = report.render()
    assert "INCOMPATIBLE" in rendered and "Thing.n" in rendered and "schemas/avro/thing.avsc@" in rendered


def test_mode_comes_from_the_eventschema_cr(repo: Path) -> None:
    write_schema(repo, V2_REQUIRED)
    assert statuses(repo)["schemas/avro/thing.avsc"] == "incompatible"  # BACKWARD: new field needs a default
    set_mode(repo, "FORWARD")
    assert statuses(repo)["schemas/avro/thing.avsc"] == "compatible"  # old readers ignore it
    set_mode(repo, "NONE")
    write_schema(repo, V2_RETYPED)
    assert statuses(repo)["schemas/avro/thing.avsc"] == "compatible"


def test_new_and_removed_files(repo: Path) -> None:
    write_schema(repo, V1, name="other")
    (repo / "schemas/avro/thing.avsc").unlink()
    report = check_schemas(repo)
    assert {c.path: c.status for c in report.files} == {
        "schemas/avro/other.avsc": "new",
        "schemas/avro/thing.avsc": "removed",
    }
    assert report.ok


def test_transitive_mode_uses_the_whole_history(repo: Path) -> None:
    set_mode(repo, "BACKWARD_TRANSITIVE")
    commit(repo, "mode")
    write_schema(repo, {**V1, "fields": [{"name": "id", "type": "string"}]})  # drop n
    commit(repo, "v2")
    v3 = {**V1, "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "string", "default": ""}]}
    write_schema(repo, v3)  # re-add n as a string: fine against v2, not against v1
    report = check_schemas(repo)
    (check,) = report.files
    assert check.status == "incompatible", report.render()
    assert len(check.problems) == 1 and "n" in check.problems[0].path
    set_mode(repo, "BACKWARD")
    assert statuses(repo)["schemas/avro/thing.avsc"] == "compatible"


def test_against_an_explicit_revision(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD").strip()
    write_schema(repo, V2_OPTIONAL)
    commit(repo, "v2")
    write_schema(repo, V1)
    # Against HEAD (v2) dropping the optional field is fine under BACKWARD; against v1 nothing changed.
    assert statuses(repo) == {"schemas/avro/thing.avsc": "compatible"}
    assert statuses(repo, first) == {"schemas/avro/thing.avsc": "unchanged"}
    report = check_schemas(repo, "no-such-rev")
    assert not report.ok and report.files[0].detail == "unknown git revision"


def test_default_revision_prefers_merge_base_with_origin_main(repo: Path) -> None:
    assert default_revision(repo) == "HEAD"
    base = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-ref", "refs/remotes/origin/main", base)
    write_schema(repo, V2_OPTIONAL)
    commit(repo, "feature")
    assert default_revision(repo) == base


def test_not_a_git_checkout(tmp_path: Path) -> None:
    (tmp_path / "schemas/avro").mkdir(parents=True)
    write_schema(tmp_path, V1)
    report = check_schemas(tmp_path)
    assert report.ok and report.skipped and "not a git checkout" in report.skipped


def test_repository_without_commits(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    report = check_schemas(tmp_path)
    assert report.ok and report.skipped and "no commit" in report.skipped


def test_cli_exit_codes(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema-check", "--root", str(repo)]) == 0
    write_schema(repo, V2_RETYPED)
    assert main(["schema-check", "--root", str(repo)]) == 1
    assert "Thing.n" in capsys.readouterr().out
