"""`bertflow registry export` (issues 22 and 26): a version leaves the registry as exactly
the bytes verified against its manifest, servable by MLflow without bertflow installed,
and says whether transformers would predict what bertflow predicts. Registration refuses
a store that returns other bytes than were uploaded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import tiny_hf_bert
from workflows import tracking as t
from workflows.cli import main as cli
from workflows.integrity import MANIFEST_FILE
from workflows.ops import hf_import
from workflows.ops import registry as r

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _classifier(folder: Path, pooling: str) -> Path:
    import torch

    import bert_core
    from workflows.model_folder import write_task_meta

    torch.manual_seed(0)
    config = bert_core.BertConfig.preset("tiny", vocab_size=64, classifier_pooling=pooling,
                                         id2label={0: "neg", 1: "pos"})
    bert_core.BertForSequenceClassification(config).save_pretrained(folder)
    words = SPECIALS + [f"w{i}" for i in range(59)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    write_task_meta(folder, {"task": "seq-cls", "labels": ["neg", "pos"], "max_seq_len": 16})
    return folder


def _register(folder: Path, name: str, task: str, tracking_uri: str) -> None:
    run_id = t.open_run(tracking_uri, "bertflow", f"make-{name}", tags={}, params={})
    t.log_and_register(folder, run_id=run_id, uri=tracking_uri, task=task, tags={},
                       register_as=name)


def test_export_writes_exactly_the_verified_bytes(tmp_path, minilm_dir, tracking_uri, capsys):
    hf_import.import_hf(tiny_hf_bert(tmp_path / "tiny", minilm_dir), "tiny", tracking_uri)
    out = tmp_path / "exports" / "tiny"
    assert cli(["registry", "export", "tiny@latest", str(out),
                "--tracking-uri", tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert f"mlflow models serve -m {out}" in printed and "sha256sum -c" in printed
    manifest = (out / MANIFEST_FILE).read_text()
    mv = t.get_model_version("models:/tiny/1", tracking_uri)
    assert hashlib.sha256(manifest.encode()).hexdigest() == mv.tags[t.TAG_MANIFEST]
    listed = dict(reversed(line.split("  ", 1)) for line in manifest.splitlines())
    on_disk = {p.relative_to(out).as_posix(): _sha(p) for p in out.rglob("*") if p.is_file()}
    assert on_disk == {**listed, MANIFEST_FILE: _sha(out / MANIFEST_FILE)}  # nothing else
    stored = Path(urlparse(r.show_model("tiny/1", tracking_uri)["model_artifacts"]).path)
    assert all(_sha(stored / rel) == digest for rel, digest in listed.items())
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary left
    with pytest.raises(r.RegistryError, match="already exists"):
        r.export("tiny/1", out, tracking_uri)

    # A version changed in the store is not exported, and nothing appears.
    weights = stored / "artifacts" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(t.IntegrityError, match=r"model.safetensors \(MISMATCH\)"):
        r.export("tiny/1", tmp_path / "exports" / "again", tracking_uri)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_the_logged_model_serves_without_an_installed_bertflow(tmp_path, minilm_dir,
                                                               tracking_uri):
    """MLflow's default environment manager installs requirements.txt and loads the model:
    bertflow's code travels in the model (code/), the requirements name no local build."""
    hf_import.import_hf(tiny_hf_bert(tmp_path / "tiny", minilm_dir), "tiny", tracking_uri)
    out = r.export("tiny/1", tmp_path / "served", tracking_uri).folder
    reqs = (out / "requirements.txt").read_text().split()
    assert not any("+" in req for req in reqs), reqs  # no `torch==2.13.0+cpu`
    assert any(req.startswith("torch==") for req in reqs)
    assert any(req.startswith("tokenizers==") for req in reqs)
    assert (out / "code" / "workflows" / "serving" / "predictor.py").is_file()
    assert (out / "code" / "bert_core" / "model.py").is_file()
    # A Python that sees the installed libraries but not bertflow (its editable install
    # is a .pth file, which -S skips): the model's own code is what runs.
    script = (
        "import importlib.util, json, mlflow.pyfunc, pandas as pd, sys\n"
        "assert importlib.util.find_spec('workflows') is None, 'bertflow is importable'\n"
        f"model = mlflow.pyfunc.load_model({str(out)!r})\n"
        "res = model.predict(pd.DataFrame({'text': ['the cat sat', 'a dog']}))\n"
        "import workflows; print(json.dumps({'rows': len(res), 'from': workflows.__file__}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    run = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["rows"] == 2 and report["from"].startswith(str(out / "code"))


def test_a_file_swapped_in_the_store_before_registration_is_not_blessed(tmp_path, minilm_dir,
                                                                         tracking_uri):
    folder = tiny_hf_bert(tmp_path / "tiny", minilm_dir)
    uploaded = t.uploaded_files(folder)  # hashed before the upload
    run_id = t.open_run(tracking_uri, "bertflow", "swap", tags={}, params={})
    model_uri = t.log_bert_model(folder, run_id=run_id, tracking_uri=tracking_uri)
    # Whoever can write the store swaps the weights between the upload and registration.
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    stored = Path(urlparse(mlflow.get_logged_model(model_uri.removeprefix("models:/"))
                           .artifact_location).path)
    (stored / "artifacts" / "tiny" / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(t.IntegrityError, match="other bytes than were uploaded for "
                                               "artifacts/tiny/model.safetensors"):
        t.register_model_version(model_uri, "swapped", tracking_uri=tracking_uri,
                                 uploaded=uploaded)
    assert r.list_models(tracking_uri) == []


def test_a_mean_pooled_classifier_says_transformers_cannot_reproduce_it(tmp_path,
                                                                         tracking_uri):
    import torch
    import transformers

    import bert_core

    for pooling in ("cls", "mean"):
        _register(_classifier(tmp_path / pooling / "model", pooling), f"clf-{pooling}",
                  "seq-cls", tracking_uri)
    ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]])
    mask = (ids != 0).long()

    out = r.export("clf-cls/1", tmp_path / "x-cls", tracking_uri)
    assert out.transformers is None
    ours = bert_core.BertForSequenceClassification.from_pretrained(out.model_folder).eval()
    theirs = transformers.BertForSequenceClassification.from_pretrained(out.model_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits,
                                   ours(ids, mask).logits, rtol=1e-4, atol=1e-5)

    out = r.export("clf-mean/1", tmp_path / "x-mean", tracking_uri)
    assert "--pooling mean" in out.transformers and "predict something else" in out.transformers
    ours = bert_core.BertForSequenceClassification.from_pretrained(out.model_folder).eval()
    theirs = transformers.BertForSequenceClassification.from_pretrained(out.model_folder).eval()
    with torch.no_grad():  # what the caveat is about: transformers silently differs
        assert not torch.allclose(theirs(input_ids=ids, attention_mask=mask).logits,
                                  ours(ids, mask).logits, atol=1e-3)
