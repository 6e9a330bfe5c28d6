"""EventSchema CRs generated from schemas/avro: the CI gate and the generator's behaviour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from services.declarations.__main__ import main
from services.declarations.manifests import (
    GENERATED_FROM,
    ManifestError,
    resource_name_for,
    subject_for,
    sync_manifests,
)
from services.declarations.resources import load_declarations

REPO_ROOT = Path(__file__).resolve().parents[3]

THING = {
    "type": "record",
    "name": "Thing",
    "namespace": "test",
    "doc": "A test record whose doc is long enough to be wrapped by the YAML dumper, which must not change it.",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": ["null", "long"], "default": None}],
}


def test_generated_manifests_are_in_sync() -> None:
    """The CI gate: fails when an .avsc changed without `make manifests`."""
    report = sync_manifests(REPO_ROOT, check=True)
    assert report.in_sync, "\n".join(report.out_of_sync) + "\n-> run `make manifests`"


def test_repository_schema_crs_embed_the_avsc_files() -> None:
    declarations = load_declarations(REPO_ROOT / "deploy/k8s")
    avsc_files = sorted((REPO_ROOT / "schemas/avro").glob("*.avsc"))
    assert avsc_files
    for avsc in avsc_files:
        schema = declarations.schema(resource_name_for(avsc))
        assert schema.schema == json.loads(avsc.read_text())
        assert schema.subject == avsc.stem
        assert schema.source_file == f"schemas/avro/{avsc.name}"


def test_names() -> None:
    assert resource_name_for(Path("schemas/avro/raw_event.avsc")) == "raw-event"
    assert resource_name_for(Path("Order_Line.v2.avsc")) == "order-line-v2"
    assert subject_for(Path("schemas/avro/raw_event.avsc")) == "raw_event"
    with pytest.raises(ManifestError, match="DNS-1123"):
        resource_name_for(Path("_bad_.avsc"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "schemas/avro").mkdir(parents=True)
    (tmp_path / "schemas/avro/thing_event.avsc").write_text(json.dumps(THING, indent=2))
    shutil.copytree(REPO_ROOT / "deploy/k8s/crds", tmp_path / "deploy/k8s/crds")
    (tmp_path / "deploy/k8s/topics").mkdir()
    return tmp_path


def test_generate_then_check(repo: Path) -> None:
    assert not sync_manifests(repo, check=True).in_sync
    report = sync_manifests(repo)
    cr_path = repo / "deploy/k8s/schemas/thing-event.yaml"
    assert set(report.written) == {cr_path, repo / "deploy/k8s/kustomization.yaml"}
    assert sync_manifests(repo, check=True).in_sync
    assert sync_manifests(repo).written == []  # idempotent

    text = cr_path.read_text()
    assert text.startswith("# GENERATED from schemas/avro/thing_event.avsc by `make manifests`")
    document = yaml.safe_load(text)
    assert document["metadata"] == {
        "name": "thing-event",
        "labels": {"app.kubernetes.io/part-of": "lambda-pipeline"},
        "annotations": {GENERATED_FROM: "schemas/avro/thing_event.avsc"},
    }
    assert document["spec"]["schema"] == THING
    assert list(document["spec"]["schema"]) == list(THING)  # key order follows the .avsc
    (schema,) = load_declarations(repo / "deploy/k8s").schemas
    assert (schema.subject, schema.compatibility.value) == ("thing_event", "BACKWARD")

    kustomization = yaml.safe_load((repo / "deploy/k8s/kustomization.yaml").read_text())
    assert kustomization["resources"] == [
        "crds/eventschemas.lambdapipeline.io.yaml",
        "crds/kafkatopics.lambdapipeline.io.yaml",
        "crds/kopfpeerings.kopf.dev.yaml",
        "schemas/thing-event.yaml",
    ]


def test_check_detects_an_edited_avsc(repo: Path) -> None:
    sync_manifests(repo)
    changed = dict(THING, fields=[*THING["fields"], {"name": "x", "type": "int", "default": 0}])
    (repo / "schemas/avro/thing_event.avsc").write_text(json.dumps(changed))
    report = sync_manifests(repo, check=True)
    assert report.out_of_sync == ["deploy/k8s/schemas/thing-event.yaml is out of date"]


def test_compatibility_edited_in_the_cr_survives_regeneration(repo: Path) -> None:
    sync_manifests(repo)
    cr_path = repo / "deploy/k8s/schemas/thing-event.yaml"
    cr_path.write_text(cr_path.read_text().replace("compatibility: BACKWARD", "compatibility: FULL_TRANSITIVE"))
    assert sync_manifests(repo, check=True).in_sync
    (repo / "schemas/avro/thing_event.avsc").write_text(json.dumps(dict(THING, doc="changed")))
    sync_manifests(repo)
    assert "compatibility: FULL_TRANSITIVE" in cr_path.read_text()


def test_orphans_are_removed_but_hand_written_crs_kept(repo: Path) -> None:
    sync_manifests(repo)
    hand_written = repo / "deploy/k8s/schemas/manual.yaml"
    hand_written.write_text("apiVersion: lambdapipeline.io/v1alpha1\nkind: EventSchema\nmetadata: {name: manual}\n")
    (repo / "schemas/avro/thing_event.avsc").unlink()
    check = sync_manifests(repo, check=True)
    assert "deploy/k8s/schemas/thing-event.yaml was generated from a deleted .avsc" in check.out_of_sync
    report = sync_manifests(repo)
    assert report.removed == [repo / "deploy/k8s/schemas/thing-event.yaml"]
    assert hand_written.exists()
    kustomization = yaml.safe_load((repo / "deploy/k8s/kustomization.yaml").read_text())
    assert "schemas/manual.yaml" in kustomization["resources"]
    assert "schemas/thing-event.yaml" not in kustomization["resources"]


def test_topics_are_listed_in_the_kustomization(repo: Path) -> None:
    shutil.copy(REPO_ROOT / "deploy/k8s/topics/events-raw.yaml", repo / "deploy/k8s/topics/")
    sync_manifests(repo)
    kustomization = yaml.safe_load((repo / "deploy/k8s/kustomization.yaml").read_text())
    assert "topics/events-raw.yaml" in kustomization["resources"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ('"string"', "top-level schema must be an object"),
        ('{"type": "record", "name": "R", "fields": [{"name": "a", "type": "nope"}]}', "not a valid Avro schema"),
    ],
)
def test_invalid_avsc_is_reported_with_its_file(repo: Path, content: str, message: str) -> None:
    (repo / "schemas/avro/broken.avsc").write_text(content)
    with pytest.raises(ManifestError, match=message) as caught:
        sync_manifests(repo)
    assert "broken.avsc" in str(caught.value)


def test_cli_check_tells_how_to_fix(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifests", "--check", "--root", str(repo)]) == 1
    assert "run `make manifests`" in capsys.readouterr().err
    assert main(["manifests", "--root", str(repo)]) == 0
    assert main(["manifests", "--check", "--root", str(repo)]) == 0
    assert "in sync" in capsys.readouterr().out
