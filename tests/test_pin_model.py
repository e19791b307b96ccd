"""Pinning a model reference (workflows.tracking.pin_model): a run's base or init model is
resolved once, and what it records is what it loads. Real sqlite MLflow, no Ray."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.helpers import tiny_hf_bert
from workflows import tracking as t
from workflows.integrity import folder_manifest, text_sha256
from workflows.ops import hf_import
from workflows.ops import registry as r


def _versions(tmp_path: Path, minilm_dir: Path, tracking_uri: str, n: int = 2) -> list[Path]:
    """`tiny` versions 1..n (different random weights); champion -> 1."""
    import torch

    folders = []
    for i in range(1, n + 1):
        torch.manual_seed(i)
        folders.append(tiny_hf_bert(tmp_path / f"tiny{i}", minilm_dir))
        hf_import.import_hf(folders[-1], "tiny", tracking_uri)
    r.promote("tiny", "1", "champion", tracking_uri)
    weights = {(f / "model.safetensors").read_bytes() for f in folders}
    assert len(weights) == n
    return folders


def test_an_alias_moved_after_the_pin_cannot_change_what_is_loaded(tmp_path, minilm_dir,
                                                                    tracking_uri):
    v1, v2 = _versions(tmp_path, minilm_dir, tracking_uri)
    pin = t.pin_model("models:/tiny@champion", tracking_uri)
    # Someone promotes version 2 between the pin and the download.
    r.promote("tiny", "2", "champion", tracking_uri)
    folder = pin.fetch(tmp_path / "dl")

    assert (pin.name, pin.version, pin.uri) == ("tiny", "1", "models:/tiny/1")
    assert (folder / "model.safetensors").read_bytes() == (v1 / "model.safetensors").read_bytes()
    mv1 = t.get_model_version("models:/tiny/1", tracking_uri)
    assert pin.lineage == {
        t.TAG_BASE_MODEL: "models:/tiny/1", t.TAG_BASE_VERSION: "1",
        t.TAG_BASE_RUN: mv1.run_id, t.TAG_BASE_FINGERPRINT: mv1.tags[t.TAG_MANIFEST],
        t.TAG_BASE_REF: "models:/tiny@champion"}
    assert pin.params("base") == {"base": "models:/tiny/1", "base_ref": "models:/tiny@champion"}
    # The alias did move: resolving it again now gives version 2's bytes.
    again = t.resolve_model("models:/tiny@champion", tmp_path / "dl2", tracking_uri)
    assert (again / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()
    # A pin is plain values: it travels to a sweep's trial actors inside their plan.
    assert pickle.loads(pickle.dumps(pin)) == pin


def test_a_pinned_version_is_checked_against_the_manifest_hash_the_pin_read(
        tmp_path, minilm_dir, tracking_uri):
    """What the run records (TAG_BASE_FINGERPRINT) is what it loads: files changed after
    the pin, with their manifest and the version's tag rewritten to match, are refused by
    the pin even though a fresh resolve now accepts them."""
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    from workflows.integrity import MANIFEST_FILE, build_manifest

    _versions(tmp_path, minilm_dir, tracking_uri, n=1)
    pin = t.pin_model("models:/tiny@champion", tracking_uri)
    stored = Path(urlparse(r.show_model("tiny/1", tracking_uri)["model_artifacts"]).path)
    (stored / "pyfunc.py").write_text("print('not the code that was pinned')\n")
    manifest = build_manifest(stored)
    (stored / MANIFEST_FILE).write_text(manifest)
    MlflowClient(tracking_uri, tracking_uri).set_model_version_tag(
        "tiny", "1", t.TAG_MANIFEST, text_sha256(manifest))

    t.resolve_model("models:/tiny@champion", tmp_path / "fresh", tracking_uri)  # consistent now
    with pytest.raises(t.IntegrityError, match=r"version 1 of tiny.*bertflow.sha256 \(MISMATCH\)"):
        pin.fetch(tmp_path / "dl")


def test_a_pinned_folder_records_its_sha256_and_refuses_a_folder_rewritten_since(
        tmp_path, minilm_dir):
    src = tiny_hf_bert(tmp_path / "ckpt" / "model", minilm_dir)  # a checkpoint's model/
    (tmp_path / "elsewhere.txt").write_text("a file the folder links to\n")
    (src / "notes.txt").symlink_to(tmp_path / "elsewhere.txt")  # as in an HF cache snapshot

    pin = t.pin_model(str(tmp_path / "ckpt"))
    fingerprint = text_sha256(folder_manifest(src))
    assert pin.uri == str(src.resolve()) and pin.version is None
    assert pin.lineage == {t.TAG_BASE_MODEL: str(src.resolve()),
                           t.TAG_BASE_FINGERPRINT: fingerprint,
                           t.TAG_BASE_REF: str(tmp_path / "ckpt")}
    copy = pin.fetch(tmp_path / "dl")
    assert not (copy / "notes.txt").is_symlink()
    assert (copy / "notes.txt").read_text() == "a file the folder links to\n"
    assert text_sha256(folder_manifest(copy)) == fingerprint

    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-1] + b"!")
    with pytest.raises(t.IntegrityError, match="changed after this run pinned them"):
        pin.fetch(tmp_path / "dl2")


def test_pinning_what_does_not_exist_names_it(tmp_path, tracking_uri):
    with pytest.raises(t.ModelNotFound, match="nope@champion"):
        t.pin_model("models:/nope@champion", tracking_uri)
    with pytest.raises(t.TrackingError, match="not found: give models:/NAME@ALIAS"):
        t.pin_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(t.TrackingError, match="holds no config.json"):
        t.pin_model(str(tmp_path / "empty"))


def test_a_resumed_run_keeps_the_base_its_run_recorded_when_it_started():
    """Pretraining resumed after `--init models:/X@latest` moved on: its checkpoints
    continue from the version the run pinned first, so that is what is registered."""
    started = {t.TAG_BASE_MODEL: "models:/x/2", t.TAG_BASE_VERSION: "2",
               t.TAG_BASE_REF: "models:/x@latest", t.TAG_BASE_FINGERPRINT: "a" * 64,
               t.TAG_RUN_NAME: "r", "mlflow.user": "someone"}
    now = {t.TAG_DATASET_FINGERPRINT: "d", t.TAG_BASE_MODEL: "models:/x/3",
           t.TAG_BASE_VERSION: "3", t.TAG_BASE_DATASET: "e", t.TAG_BASE_REF: "models:/x@latest",
           t.TAG_BASE_FINGERPRINT: "b" * 64}
    assert t.started_from(now, started) == {
        t.TAG_DATASET_FINGERPRINT: "d", t.TAG_BASE_MODEL: "models:/x/2",
        t.TAG_BASE_VERSION: "2", t.TAG_BASE_REF: "models:/x@latest",
        t.TAG_BASE_FINGERPRINT: "a" * 64}
    # A run that started from a new model records no base, whatever --init says now.
    assert t.started_from(now, {t.TAG_RUN_NAME: "r"}) == {t.TAG_DATASET_FINGERPRINT: "d"}
