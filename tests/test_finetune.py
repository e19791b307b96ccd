"""Fine-tuning the real MiniLM for BERT's four uses, on small data built here.

Every run goes through the whole path a user takes: task file -> data_prep.tasks (Ray
Data, Parquet, manifest) -> the one Ray Train loop -> MLflow run -> pyfunc -> registry.
Runs are kept tiny (a few hundred examples, short sequences, 1-3 epochs) so the module
stays within its share of `make test`; what is asserted is that each model clearly beats
the trivial baseline computed on the same eval file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import finetune_data as D

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, minilm_dir, ray_local):
    """One registered seq-cls model shared by the prediction, pyfunc and serving tests,
    fine-tuned from MiniLM registered as `minilm-base` and named by an alias."""
    tmp = tmp_path_factory.mktemp("seqcls")
    D.write_sentiment(tmp / "train.csv", 240, seed=1)
    D.write_sentiment(tmp / "eval.jsonl", 80, seed=2, fmt="jsonl")
    with (tmp / "train.csv").open("a") as f:  # bad rows are counted, not fatal
        f.write(',pos\n"a film with no label",\n"great fun",meh\n')
    from workflows.ops import hf_import, registry
    from workflows.training.finetune import run_finetune

    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    hf_import.import_hf(minilm_dir, "minilm-base", uri)
    registry.promote("minilm-base", "1", "champion", uri)
    cfg = D.finetune_config(tmp, minilm_dir, "seq-cls", tmp / "train.csv", tmp / "eval.jsonl",
                  register_as="sentiment", labels=["neg", "pos"],
                  base="models:/minilm-base@champion")
    return tmp, cfg, run_finetune(cfg)


def test_seq_cls_beats_majority_class_and_is_registered_with_lineage(sentiment, minilm_dir):
    """...and `registry show` names the exact base version trained from, not the alias."""
    tmp, cfg, result = sentiment
    assert result.baseline["accuracy"] < 0.75
    assert result.metrics["val_accuracy"] >= result.baseline["accuracy"] + 0.2
    assert result.metrics["val_macro_f1"] > 0.8
    assert [k for k in result.history if k.startswith("epoch")] == [  # each epoch's end
        "epoch 1 (step 15)", "epoch 2 (step 30)"]
    assert result.skipped["train"]["by_reason"] == {"missing field": 2, "unknown label": 1}
    from workflows import tracking as T

    mv = T.client(cfg.tracking.tracking_uri).get_model_version("sentiment", result.model_version)
    assert mv.tags[T.TAG_TASK] == "seq-cls"
    assert json.loads(mv.tags["bertflow.labels"]) == ["neg", "pos"]
    assert mv.tags[T.TAG_BASE_MODEL] == "models:/minilm-base/1"
    assert mv.tags[T.TAG_BASE_REF] == "models:/minilm-base@champion"
    from workflows.ops.registry import render_model, show_model

    info = show_model(f"sentiment/{result.model_version}", cfg.tracking.tracking_uri)
    assert info["base_model_chain"] == ["models:/minilm-base/1", str(minilm_dir.resolve())]
    assert info["params"]["base"] == "models:/minilm-base/1"
    assert info["params"]["base_ref"] == "models:/minilm-base@champion"
    text = render_model(info)
    assert f"sentiment/{result.model_version} <- models:/minilm-base/1 <- " in text
    assert "base_model_ref   models:/minilm-base@champion" in text
    meta = json.loads((Path(result.model_dir) / "bertflow.json").read_text())
    assert mv.tags[T.TAG_DATASET_FINGERPRINT] == meta["dataset_fingerprint"]
    assert meta["base_model"] == "models:/minilm-base/1"
    assert float(mv.tags["metric.val_accuracy"]) == pytest.approx(result.metrics["val_accuracy"], abs=1e-5)
    config = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}


def test_registered_model_loads_as_pyfunc_without_pickle(sentiment):
    import mlflow
    import pandas as pd

    tmp, cfg, result = sentiment
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/sentiment/{result.model_version}")
    out = model.predict(pd.DataFrame({"text": ["what a wonderful film !",
                                               "the plot was dreadful .", ""]}))
    assert out["label"].tolist()[:2] == ["pos", "neg"]
    assert all(0.5 < s <= 1 for s in out["score"][:2])
    assert out["error"].tolist() == [None, None, "missing field 'text'"]


def test_bertflow_predict_cli_writes_every_row(sentiment, tmp_path):
    from workflows.cli import main

    tmp, cfg, result = sentiment
    src = tmp_path / "reviews.csv"
    src.write_text("id,text\n1,a delightful story\n2,\n3,the acting was awful\n")
    out = tmp_path / "scored.jsonl"
    code = main(["predict", "--model", f"models:/sentiment/{result.model_version}",
                 "--input", str(src), "--output", str(out), "--tracking-uri", cfg.tracking.tracking_uri])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert [r["label"] for r in rows] == ["pos", None, "neg"]
    assert rows[1]["error"] == "missing field 'text'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_a_prediction_request(sentiment, tmp_path):
    tmp, cfg, result = sentiment
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri,  # uvicorn from this venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log_file = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", f"models:/sentiment/{result.model_version}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start in 180 s"
            time.sleep(1)
        body = json.dumps({"dataframe_records": [{"text": "a lovely and moving film"},
                                                 {"text": "honestly , a tedious plot"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        assert [p["label"] for p in preds] == ["pos", "neg"]
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log_file.close()


def test_frozen_encoder_trains_only_the_head(sentiment, minilm_dir):
    """Frozen mode: the encoder's weights come back unchanged, far fewer parameters train
    (cheaper), and the head alone does no better than full fine-tuning."""
    import torch

    import bert_core

    tmp, _, full = sentiment
    from workflows.training.finetune import run_finetune

    cfg = D.finetune_config(tmp, minilm_dir, "seq-cls", tmp / "train.csv", tmp / "eval.jsonl",
                  labels=["neg", "pos"], freeze_encoder=True, epochs=1, lr=1e-3)
    frozen = run_finetune(cfg)
    # A folder base is recorded by its path and the sha256 of its files.
    from workflows import tracking as T
    from workflows.integrity import folder_manifest, text_sha256

    tags = T.client(cfg.tracking.tracking_uri).get_run(frozen.run_id).data.tags
    assert tags[T.TAG_BASE_MODEL] == str(minilm_dir.resolve())
    assert tags[T.TAG_BASE_FINGERPRINT] == text_sha256(folder_manifest(minilm_dir))
    base = bert_core.BertModel.from_pretrained(minilm_dir)
    tuned = bert_core.BertForSequenceClassification.from_pretrained(frozen.model_dir)
    # --freeze-encoder picks mean pooling: the encoder minus MiniLM's (NSP) pooler is kept
    assert tuned.config.classifier_pooling == "mean" and tuned.bert.pooler is None
    base_state = base.state_dict()
    for name, p in tuned.bert.state_dict().items():
        assert torch.equal(p, base_state[name]), name
    tuned.freeze_encoder()
    assert tuned.num_parameters(trainable_only=True) == 384 * 2 + 2
    assert tuned.num_parameters() > 20_000_000
    assert frozen.metrics["val_accuracy"] <= full.metrics["val_accuracy"]


def test_pair_cls_beats_majority_class(tmp_path, minilm_dir, ray_local):
    from workflows.training.finetune import run_finetune

    D.write_pairs(tmp_path / "train.jsonl", 320, seed=3)
    D.write_pairs(tmp_path / "eval.jsonl", 80, seed=4)
    result = run_finetune(D.finetune_config(tmp_path, minilm_dir, "pair-cls", tmp_path / "train.jsonl",
                                  tmp_path / "eval.jsonl", epochs=2))
    assert result.metrics["val_accuracy"] >= result.baseline["accuracy"] + 0.2


def test_token_cls_finds_entities_like_seqeval(tmp_path, minilm_dir, ray_local):
    from workflows.training.finetune import run_finetune
    from workflows.serving.predictor import Predictor

    D.write_conll(tmp_path / "train.conll", 240, seed=5)
    D.write_conll(tmp_path / "eval.conll", 60, seed=6)
    result = run_finetune(D.finetune_config(tmp_path, minilm_dir, "token-cls", tmp_path / "train.conll",
                                  tmp_path / "eval.conll"))
    assert result.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert result.baseline["f1"] == 0.0
    assert result.metrics["val_f1"] > 0.7
    tags = Predictor.from_dir(result.model_dir).tag_words(
        [["Maria", "Rossi", "flew", "to", "Lisbon", "."]])
    assert tags == [["B-PER", "I-PER", "O", "O", "B-LOC", "O"]]


def test_qa_v2_answers_from_windows_and_abstains(tmp_path, minilm_dir, ray_local):
    from workflows.training.finetune import run_finetune
    from workflows.serving.predictor import Predictor

    D.write_squad(tmp_path / "train.json", 50, seed=7, v2=True)
    D.write_squad(tmp_path / "eval.json", 15, seed=8, v2=True)
    # doc_stride smaller than the context: every example spans several windows.
    result = run_finetune(D.finetune_config(tmp_path, minilm_dir, "qa", tmp_path / "train.json",
                                  tmp_path / "eval.json", max_seq_len=40, doc_stride=12,
                                  epochs=3, lr=1e-4, batch_size=8))
    assert result.metrics["val_f1"] >= result.baseline["f1"] + 25
    assert "val_HasAns_f1" in result.metrics and "val_NoAns_exact" in result.metrics
    context = "Lena Novak was born in Cape Town in 1987. It rained a lot that spring."
    out = Predictor.from_dir(result.model_dir).answer(["Where was Lena born?"], [context])
    assert out["answer"][0] == context[out["start"][0]:out["end"][0]]
    assert out["answer"][0] in ("Cape Town", "Cape Town in 1987")
