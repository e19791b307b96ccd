"""Pretraining end to end on this machine: data_prep dataset -> 2 Ray Train workers ->
MLflow run and registry; a worker is SIGKILLed mid-run and the run resumes from its
checkpoint. Plus the checks that stop a mismatched model before any work."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from bert_core.config_io import ConfigError
from tests.helpers import templated_corpus
from workflows.config import PretrainConfig, config_from_mapping

# ---------------------------------------------------------------- no Ray


def test_config_needs_data_and_run_name_and_rejects_bad_values():
    with pytest.raises(ConfigError, match="run_name"):
        PretrainConfig(data="d").validate_for_run()
    with pytest.raises(ConfigError, match="run_name"):
        PretrainConfig(data="d", run_name="a/b")
    with pytest.raises(ConfigError, match="warmup_steps"):
        config_from_mapping(PretrainConfig, dict(data="d", run_name="r", warmup_steps=20,
                                                 max_steps=10))
    with pytest.raises(ConfigError, match="fp16"):
        config_from_mapping(PretrainConfig, dict(data="d", run_name="r", precision="fp16"))


def test_vocab_mismatch_with_init_model_is_an_error_naming_both(minilm_dir, tmp_path):
    from data_prep.manifest import Manifest
    from data_prep.tokenizer import WordPieceTokenizer
    from workflows.training.pretrain import PretrainError, _model_config

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]
    small = WordPieceTokenizer({t: i for i, t in enumerate(vocab)})
    manifest = Manifest(kind="pretraining", config={"max_seq_len": 64}, inputs=[],
                        tokenizer={})
    cfg = PretrainConfig(data=str(tmp_path / "ds"), run_name="r", init=str(minilm_dir))
    with pytest.raises(PretrainError, match=r"tokenizer \(30522 tokens.*15 tokens"):
        _model_config(cfg, small, manifest, minilm_dir)
    # A fresh model takes the dataset's vocabulary; a too-long dataset is refused.
    fresh = PretrainConfig(data=str(tmp_path / "ds"), run_name="r", model_size="tiny")
    assert _model_config(fresh, small, manifest, None)["vocab_size"] == 15
    manifest.config["max_seq_len"] = 1024
    with pytest.raises(PretrainError, match="at most 512 positions"):
        _model_config(fresh, small, manifest, None)


# ---------------------------------------------------------------- real Ray + MLflow


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: dict) -> None:
    """SIGKILL the rank-1 Train worker once Ray Train has recorded a checkpoint."""
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    pid_file = run_dir / "workers" / "rank1.pid"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = None
        if latest and pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed["pid"], killed["after"] = pid, latest["checkpoint_dir_name"]
            return
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)  # the CI machine is shared; ~3 min when idle
def test_pretrain_two_workers_survives_a_killed_worker_and_registers_the_model(
        ray_local, tmp_path, tracking_uri, monkeypatch):
    import mlflow

    from bert_core import BertForPreTraining
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from workflows import tracking as T
    from workflows.training.pretrain import PretrainError, run_pretrain

    monkeypatch.chdir(tmp_path)
    corpus = templated_corpus(tmp_path / "corpus.txt", n_docs=1600)
    build_pretraining_dataset(PrepConfig(
        input=[str(corpus)], output=str(tmp_path / "ds"), train_vocab=200, max_seq_len=64,
        masking="dynamic", dupe_factor=2, val_fraction=0.05, docs_per_unit=400,
        tokenize_workers=1))
    cfg = config_from_mapping(PretrainConfig, dict(
        data=str(tmp_path / "ds"), run_name="tiny-kill", model_size="tiny", num_workers=2,
        cpus_per_worker=0.5, batch_size=16, lr=1e-3, warmup_steps=20, max_steps=120,
        checkpoint_every=40, keep_checkpoints=2, max_failures=1, eval_every=60,
        eval_batches=4, log_every=10, storage_path=str(tmp_path / "runs"),
        tracking_uri=tracking_uri, experiment="pretrain-test", register_as="bert-tiny-test",
        log_system_metrics=False))
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "runs" / "tiny-kill", killed), daemon=True)
    killer.start()
    result = run_pretrain(cfg)
    killer.join(timeout=1)

    # The worker really died, and the run resumed from a checkpoint, not from step 0.
    assert killed, "the worker was never killed"
    assert result.step == 120
    assert result.metrics["attempt"] == 1 and result.start_step in (40, 80)
    ckpts = sorted(p.name for p in result.run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000080", "checkpoint_00000120"]  # keep_checkpoints=2

    client = T.client(tracking_uri)
    run = client.get_run(result.run_id)
    val = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_mlm_loss")}
    assert val[0] > 4.0 and val[120] < 0.6 * val[0], val  # ln(200)=5.3 at the start

    # The loss curve continues: the restarted workers log from their checkpoint onwards
    # (the steps the first attempt had sent already are not sent twice), at losses near
    # where the first attempt was, far below the first steps'.
    history = client.get_metric_history(result.run_id, "train_mlm_loss")
    restart = max(m.timestamp for m in client.get_metric_history(result.run_id, "attempt")
                  if m.value == 1)
    after = sorted((m.step, m.value) for m in history if m.timestamp >= restart)
    before = dict(sorted((m.step, m.value) for m in history if m.timestamp < restart))
    assert after[0][0] > result.start_step and after[-1][0] == 120
    assert after[0][1] < 0.8 * before[10]
    assert sorted([s for s, _ in after] + list(before)) == list(range(10, 121, 10))

    # Params, tags, the dataset input, the model.
    assert run.data.params["model_size"] == "tiny" and run.data.params["max_steps"] == "120"
    assert run.data.tags[T.TAG_VERSION] and run.data.tags[T.TAG_RUN_NAME] == "tiny-kill"
    for key in ("train_loss", "train_nsp_acc", "lr", "grad_norm", "tokens_per_s",
                "samples_per_s", "val_mlm_acc", "val_nsp_acc"):
        assert key in run.data.metrics, key
    inputs = run.inputs.dataset_inputs
    from data_prep.manifest import Manifest

    fingerprint = Manifest.load(tmp_path / "ds").fingerprint
    assert inputs and inputs[0].dataset.digest == fingerprint[:32]

    # The registered version points back to the run and the dataset, and loads (without
    # unpickling) to the same outputs as the final checkpoint.
    mv = client.get_model_version("bert-tiny-test", result.model_version)
    assert mv.tags[T.TAG_RUN_ID] == result.run_id
    assert mv.tags[T.TAG_DATASET_FINGERPRINT] == fingerprint
    local = T.resolve_model("models:/bert-tiny-test@latest", dest=tmp_path / "dl",
                            tracking_uri=tracking_uri)
    a = BertForPreTraining.from_pretrained(local).eval()
    ids = torch.randint(5, a.config.vocab_size, (2, 12))
    b = BertForPreTraining.from_pretrained(result.checkpoint_dir / "model").eval()
    with torch.no_grad():
        assert torch.equal(a(ids).prediction_logits, b(ids).prediction_logits)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/bert-tiny-test/{result.model_version}")
    import pandas as pd

    out = pyfunc.predict(pd.DataFrame({"text": ["the red cat sees the old dog ."]}))
    assert len(out) == 1

    # Running the same finished run again is refused, not silently retrained.
    with pytest.raises(PretrainError, match="already finished"):
        run_pretrain(cfg)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mlm_only_pretraining_on_two_workers_logs_scale_and_evaluates_on_both(
        ray_local, tmp_path, tracking_uri, monkeypatch):
    """MLM-only data trains on two DDP workers (no sentence head, so every parameter has a
    gradient); the global batch and tokens seen are logged; the step-0 evaluation, sharded
    over both workers and all-reduced, equals a one-worker evaluation of the same model.
    That model is `--init models:/tiny-init@latest`: the run, its params and `registry
    show` of the model it registers name the exact version (2), whose weights it trained."""
    import pyarrow.parquet as pq

    from bert_core import BertForMaskedLM
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from tests.helpers import FakeShard
    from workflows import tracking as T
    from workflows.model_folder import load_task_model
    from workflows.ops.registry import show_model
    from workflows.training.loop import evaluate
    from workflows.training.pretrain import run_pretrain
    from workflows.training.step import StepRunner

    monkeypatch.chdir(tmp_path)
    corpus = templated_corpus(tmp_path / "corpus.txt", n_docs=300)
    build_pretraining_dataset(PrepConfig(
        input=[str(corpus)], output=str(tmp_path / "ds"), train_vocab=200, max_seq_len=64,
        objective="mlm", masking="dynamic", dupe_factor=1, val_fraction=0.1,
        tokenize_workers=1))
    inits = [_register_init(tmp_path / f"init{n}", tmp_path / "ds", tracking_uri, seed=n)
             for n in (1, 2)]
    cfg = config_from_mapping(PretrainConfig, dict(
        data=str(tmp_path / "ds"), run_name="tiny-mlm", init="models:/tiny-init@latest",
        num_workers=2, cpus_per_worker=0.5, batch_size=8, grad_accum=2, lr=1e-3,
        warmup_steps=2, max_steps=6, checkpoint_every=0, eval_every=0, eval_batches=0,
        log_every=3, seed=11, storage_path=str(tmp_path / "runs"), tracking_uri=tracking_uri,
        experiment="pretrain-mlm", log_system_metrics=False, register_as="tiny-mlm"))
    result = run_pretrain(cfg)

    assert result.step == 6
    # On a private local Ray, Train starts no preemption watcher (a process) per run.
    from ray._private import state as ray_state

    classes = {a["ActorClassName"] for a in ray_state.actors().values()}
    assert "TrainController" in classes and "PreemptionWatcher" not in classes
    model = BertForMaskedLM.from_pretrained(result.model_dir, strict=True)
    assert not hasattr(model, "nsp")
    encoder = load_task_model(result.model_dir, "pretraining")  # what fine-tuning starts from
    assert torch.equal(encoder.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight)
    client = T.client(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["global_batch_size"] == "32"  # 8 x 2 workers x 2 accumulated
    seen = sorted((m.step, m.value) for m in
                  client.get_metric_history(result.run_id, "tokens_seen"))
    assert [s for s, _ in seen] == [3, 6]
    assert 32 * 3 * 8 <= seen[0][1] < seen[1][1] <= 32 * 6 * 64  # rows of 8 to 64 tokens

    # The init model, evaluated alone: version 2 (what @latest named), not version 1.
    val = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_mlm_loss")}
    table = pq.read_table(tmp_path / "ds" / "val")
    single = []
    for init in inits:
        task = _pretrain_task(cfg, init)
        initial = task.build_model()
        single.append(evaluate(task, initial, FakeShard(table), cfg.loop,
                               StepRunner(initial, cfg.loop, torch.device("cpu")),
                               torch.device("cpu"))["val_mlm_loss"])
    assert val[0] == pytest.approx(single[1], rel=1e-5)
    assert val[0] != pytest.approx(single[0], rel=1e-3)

    # Everything recorded names that exact version, and the reference as given.
    assert run.data.params["init"] == "models:/tiny-init/2"
    assert run.data.params["init_ref"] == "models:/tiny-init@latest"
    info = show_model(f"tiny-mlm/{result.model_version}", tracking_uri)
    assert info["base_model_chain"][0] == "models:/tiny-init/2"
    assert info["tags"][T.TAG_BASE_VERSION] == "2"
    assert info["tags"][T.TAG_BASE_REF] == "models:/tiny-init@latest"
    assert json.loads((Path(result.model_dir) / "bertflow.json").read_text())[
        "base_model"] == "models:/tiny-init/2"


def _register_init(folder: Path, dataset: Path, tracking_uri: str, seed: int) -> Path:
    """A tiny MLM model with the dataset's tokenizer, imported as a new `tiny-init`."""
    from bert_core import BertConfig, BertForMaskedLM
    from data_prep.tokenizer import WordPieceTokenizer
    from workflows.model_folder import save_model_folder
    from workflows.ops import hf_import

    torch.manual_seed(seed)
    vocab = WordPieceTokenizer.from_dir(dataset).vocab_size
    model = BertForMaskedLM(BertConfig.preset("tiny", vocab_size=vocab))
    save_model_folder(model, folder, dataset / "tokenizer", {"task": "pretraining"})
    hf_import.import_hf(folder, "tiny-init", tracking_uri)
    return folder


def _pretrain_task(cfg: PretrainConfig, init_dir: Path | None = None):
    """The PretrainTask `run_pretrain` builds for `cfg` (a fresh model, or `init_dir`)."""
    from data_prep.manifest import Manifest
    from data_prep.tokenizer import WordPieceTokenizer
    from workflows.training.pretrain import PretrainTask, _masking, _model_config

    manifest = Manifest.load(Path(cfg.data))
    tokenizer = WordPieceTokenizer.from_dir(Path(cfg.data))
    return PretrainTask(model_config=_model_config(cfg, tokenizer, manifest, init_dir),
                        init_dir=init_dir, tokenizer_dir=str(Path(cfg.data) / "tokenizer"),
                        pad_id=tokenizer.pad_id, masking=_masking(manifest, tokenizer),
                        objective="mlm")
