"""Check every ``schemas/avro/*.avsc`` in the working tree against the same file at a git revision.

The default revision is the merge-base with ``origin/main`` (what a pull request will be compared with),
else ``HEAD``. Each subject is checked with the compatibility mode its EventSchema CR declares; the
transitive modes use every version of the file in the revision's history, not just the last one. New
files pass. Outside a git checkout (e.g. an unpacked source archive) the check is skipped.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.declarations.avro_compat import AvroSchemaError, Incompatibility, check_compatibility
from services.declarations.manifests import AVRO_DIR, declared_compatibility

Status = Literal["compatible", "unchanged", "new", "removed", "incompatible", "error"]
_MAX_HISTORY = 200  # transitive modes: enough for any real schema's life, bounded for huge histories


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: Status
    mode: str = ""
    detail: str = ""
    problems: tuple[Incompatibility, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status not in ("incompatible", "error")


@dataclass
class SchemaCheckReport:
    revision: str | None = None
    skipped: str | None = None  # why nothing was checked
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.files)

    def render(self) -> str:
        if self.skipped:
            return f"schema-check skipped: {self.skipped}"
        lines = [f"schema-check against {self.revision}:"]
        for check in self.files:
            mode = f" [{check.mode}]" if check.mode else ""
            detail = f": {check.detail}" if check.detail else ""
            lines.append(f"  {check.status.upper():<12} {check.path}{mode}{detail}")
            lines += [f"      {problem}" for problem in check.problems]
        if not self.files:
            lines.append("  (no .avsc files)")
        return "\n".join(lines)


class GitError(RuntimeError):
    pass


def _git(cwd: Path, *args: str) -> str:
    completed = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise GitError(completed.stderr.strip() or f"git {' '.join(args)} failed")
    return completed.stdout


def _git_ok(cwd: Path, *args: str) -> bool:
    try:
        _git(cwd, *args)
    except (GitError, FileNotFoundError):
        return False
    return True


def default_revision(repo_root: Path) -> str | None:
    """Merge-base with origin/main if that ref exists, else HEAD; None when there is no commit yet."""
    if _git_ok(repo_root, "rev-parse", "--verify", "--quiet", "origin/main^{commit}"):
        try:
            return _git(repo_root, "merge-base", "HEAD", "origin/main").strip()
        except GitError:
            pass  # unrelated histories or no HEAD: fall back to HEAD
    if _git_ok(repo_root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}"):
        return "HEAD"
    return None


def check_schemas(repo_root: Path, against: str | None = None) -> SchemaCheckReport:
    """Compare the working tree's ``.avsc`` files with ``against`` (see the module docstring)."""
    repo_root = repo_root.resolve()
    try:
        toplevel = Path(_git(repo_root, "rev-parse", "--show-toplevel").strip())
    except (GitError, FileNotFoundError):
        return SchemaCheckReport(skipped=f"{repo_root} is not a git checkout")
    revision = against or default_revision(repo_root)
    if revision is None:
        return SchemaCheckReport(skipped="the repository has no commit to compare with yet")
    if not _git_ok(repo_root, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"):
        return SchemaCheckReport(revision=revision, files=[FileCheck(revision, "error", detail="unknown git revision")])
    report = SchemaCheckReport(revision=revision)
    avro_dir = repo_root / AVRO_DIR
    current_files = sorted(avro_dir.glob("*.avsc"))
    for avsc in current_files:
        report.files.append(_check_file(repo_root, toplevel, avsc, revision))
    git_dir = (avro_dir.relative_to(toplevel) if avro_dir.is_relative_to(toplevel) else AVRO_DIR).as_posix()
    old_files = _git(toplevel, "ls-tree", "--name-only", revision, f"{git_dir}/").split()
    current_names = {path.name for path in current_files}
    for old in old_files:
        if old.endswith(".avsc") and Path(old).name not in current_names:
            report.files.append(FileCheck(old, "removed", detail="producers and consumers must stop using it first"))
    return report


def _check_file(repo_root: Path, toplevel: Path, avsc: Path, revision: str) -> FileCheck:
    relative = avsc.relative_to(repo_root).as_posix()
    git_path = avsc.relative_to(toplevel).as_posix()
    mode = declared_compatibility(repo_root, avsc)
    try:
        current = json.loads(avsc.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return FileCheck(relative, "error", mode.value, f"invalid JSON: {error}")
    history = _history(toplevel, git_path, revision, transitive=mode.transitive)
    if not history:
        return FileCheck(relative, "new", mode.value)
    labels = [f"{relative}@{commit[:12]}" for commit, _ in history]
    if history[-1][1] == current:
        return FileCheck(relative, "unchanged", mode.value)
    try:
        problems = check_compatibility(current, [schema for _, schema in history], mode, labels=labels)
    except AvroSchemaError as error:
        return FileCheck(relative, "error", mode.value, f"invalid Avro schema: {error}")
    if problems:
        return FileCheck(relative, "incompatible", mode.value, f"{len(problems)} problem(s)", tuple(problems))
    return FileCheck(relative, "compatible", mode.value)


def _history(toplevel: Path, git_path: str, revision: str, *, transitive: bool) -> list[tuple[str, Any]]:
    """(commit, schema) versions of the file up to ``revision``, oldest first; invalid JSON skipped."""
    if transitive:
        commits = _git(toplevel, "log", f"-n{_MAX_HISTORY}", "--format=%H", revision, "--", git_path).split()
    else:
        commits = [_git(toplevel, "rev-parse", f"{revision}^{{commit}}").strip()]
    versions: list[tuple[str, Any]] = []
    for commit in reversed(commits):
        try:
            schema = json.loads(_git(toplevel, "show", f"{commit}:{git_path}"))
        except GitError:
            continue  # the file does not exist at that commit (deleted, or not yet created)
        except json.JSONDecodeError:
            continue  # not a schema at that commit: nothing to stay compatible with
        if not versions or versions[-1][1] != schema:
            versions.append((commit, schema))
    return versions
