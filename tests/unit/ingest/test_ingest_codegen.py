"""The committed generated code matches proto/ (regenerated into memory with grpcio-tools)."""

from services.ingest import codegen


def test_committed_code_matches_the_proto():
    stale = codegen.stale_files()
    assert not stale, f"services/ingest/v1 is out of date with proto/ ({', '.join(stale)}): {codegen.REGENERATE_HINT}"


def test_generated_stubs_import_the_committed_package(tmp_path):
    written = {path.name: path.read_text() for path in codegen.write(tmp_path)}
    assert set(written) == set(codegen.GENERATED)
    assert "from services.ingest.v1 import ingest_pb2" in written["ingest_pb2_grpc.py"]
    assert "lambda_pipeline.ingest.v1 import" not in written["ingest_pb2_grpc.py"]


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    codegen.write(tmp_path)
    (tmp_path / "ingest_pb2.py").write_text("# edited by hand\n")
    monkeypatch.setattr(codegen, "output_dir", lambda: tmp_path)
    assert codegen.main(["--check"]) == 1
    assert "run `python -m services.ingest.codegen`" in capsys.readouterr().err
