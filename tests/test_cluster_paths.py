"""Locations on a cluster: run folders, fine-tuning files and predictions on a real S3
endpoint (moto's server on 127.0.0.1), models that reach Ray workers through the object
store instead of a driver path, credentials kept out of MLflow, and bad locations or a
dead MLflow server refused before any Ray worker starts.

Real services only: the S3 server, a local Ray, a sqlite MLflow store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from workflows.config import (EmbedConfig, FinetuneConfig, PredictConfig, PretrainConfig,
                              config_from_mapping)

ADJ = "red green blue small large old new quiet loud bright".split()
NOUN = "cat dog bird river city garden teacher farmer engine violin".split()
VERB = "sees finds likes follows paints builds carries visits".split()
WARM = {"red", "bright", "loud", "large", "new"}


def _sentence(rng: np.random.Generator) -> tuple[str, str]:
    a, b = rng.choice(ADJ, 2)
    n1, n2 = rng.choice(NOUN, 2)
    return f"the {a} {n1} {rng.choice(VERB)} the {b} {n2} .", "warm" if a in WARM else "cool"


def _corpus(path: Path, n_docs: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n_docs):
        lines += [_sentence(rng)[0] for _ in range(int(rng.integers(3, 7)))] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rows = [dict(zip(("text", "label"), _sentence(rng))) for _ in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _s3():
    """A boto3 client on the session's S3 server (for the test's own checks)."""
    import os

    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        region_name="us-east-1")


def _keys(bucket: str, prefix: str = "") -> list[str]:
    pages = _s3().get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", [])
                  if not o["Key"].endswith("/"))  # pyarrow's empty "folder" markers


@pytest.fixture()
def store_ray(s3_server, ray_local):
    """The session's Ray, whose workers must get the S3 variables from the runtime env."""
    return ray_local


# ---------------------------------------------------------------- no training


def test_files_move_through_object_storage_whole(s3_bucket, tmp_path):
    """A published output appears whole under its name (no temporary object left), a
    URI input is fetched for the driver's readers, checkpoints on S3 are trusted by the
    same rules as local ones."""
    from workflows.run_folder import COMPLETE_FILE, latest_checkpoint, trusted_checkpoints
    from workflows.transfer import TransferError, local_file, staged_output

    with staged_output(f"{s3_bucket}/out/preds.csv") as tmp:
        tmp.write_text("a,b\n1,2\n")
        assert _keys(s3_bucket) == []  # nothing visible before the block ends
    assert _keys(s3_bucket) == ["out/preds.csv"]
    with pytest.raises(RuntimeError):
        with staged_output(f"{s3_bucket}/out/broken.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer died")
    assert _keys(s3_bucket) == ["out/preds.csv"]
    with local_file(f"{s3_bucket}/out/preds.csv", "--input") as path:
        assert path.suffix == ".csv" and path.read_text() == "a,b\n1,2\n"
    with pytest.raises(TransferError, match="not found"):
        with local_file(f"{s3_bucket}/nothing.csv", "--input"):
            pass

    # Checkpoint trust on S3: a completion marker with matching sizes, or Ray's snapshot.
    s3, bucket = _s3(), s3_bucket.removeprefix("s3://")
    for step, complete in ((10, True), (20, False), (30, True)):
        key = f"runs/r/checkpoint_{step:08d}"
        s3.put_object(Bucket=bucket, Key=f"{key}/model/config.json", Body=b"{}")
        s3.put_object(Bucket=bucket, Key=f"{key}/trainer_state.json",
                      Body=json.dumps({"step": step}).encode())
        sizes = {"model/config.json": 2 if complete else 3,
                 "trainer_state.json": len(json.dumps({"step": step}))}
        s3.put_object(Bucket=bucket, Key=f"{key}/{COMPLETE_FILE}",
                      Body=json.dumps({"files": sizes}).encode())
    run = f"{s3_bucket}/runs/r"
    assert trusted_checkpoints(run) == [f"{run}/checkpoint_00000010",
                                        f"{run}/checkpoint_00000030"]
    assert latest_checkpoint(run) == f"{run}/checkpoint_00000030"


def test_a_cluster_of_several_nodes_needs_shared_storage_and_an_mlflow_server(caplog):
    """./runs and a sqlite store are node-local: refused as soon as a second node is alive
    (the two-node cluster test runs the accepted setup end to end)."""
    from workflows.config import LoopSettings
    from workflows.training.contracts import TrainingError
    from workflows.training.engine import check_cluster_storage

    server = "http://head:5000"
    check_cluster_storage(LoopSettings(), "sqlite:////x/mlruns.db", nodes=1)  # one machine
    with pytest.raises(TrainingError, match="2 nodes and no --storage-path.*s3://BUCKET/runs"):
        check_cluster_storage(LoopSettings(), server, nodes=2)
    with pytest.raises(TrainingError, match="sqlite:////x/mlruns.db is a file.*bertflow server"):
        check_cluster_storage(LoopSettings(storage_path="s3://b/runs"),
                              "sqlite:////x/mlruns.db", nodes=2)
    check_cluster_storage(LoopSettings(storage_path="s3://b/runs"), server, nodes=3)
    check_cluster_storage(LoopSettings(storage_path="/mnt/nfs/runs"), server, nodes=2)
    assert "every node mounts" in caplog.text


def test_bad_locations_and_a_dead_server_are_refused_before_ray(s3_server, tmp_path,
                                                                tracking_uri, minilm_dir):
    """Exit 2 with the location and what to set, before any Ray worker starts."""
    from tests.services import free_ports
    from workflows.tracking import TrackingError
    from workflows.training.finetune import run_finetune

    (tmp_path / "train.jsonl").write_bytes(_jsonl(8, 0))
    base = dict(task="seq-cls", train=str(tmp_path / "train.jsonl"), base=str(minilm_dir),
                tracking_uri=tracking_uri, data_dir=str(tmp_path / "data"))

    # The MLflow server is down: said at once, through the CLI, with exit code 2.
    dead = f"http://alice:s3cret@127.0.0.1:{free_ports(1)[0]}"
    proc = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "finetune", "--base", "models:/nope@latest",
         "--train", str(tmp_path / "train.jsonl"), "--tracking-uri", dead],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "MLflow server at http://alice:***@127.0.0.1:" in proc.stderr
    assert "is not reachable" in proc.stderr and "bertflow server" in proc.stderr
    assert "MLFLOW_TRACKING_URI" in proc.stderr and "s3cret" not in proc.stderr

    # A URI's user:password never becomes a param or tag of a run.
    from workflows import tracking as T

    run_id = T.open_run(tracking_uri, "secrets", "r", tags={"source": dead},
                        params={"tracking_uri": dead, "nested": {"uri": dead}})
    run = T.client(tracking_uri).get_run(run_id)
    assert run.data.params["tracking_uri"] == dead.replace("alice:s3cret", "alice:***")
    assert "s3cret" not in json.dumps([run.data.params, run.data.tags])

    # A registered base that does not exist.
    with pytest.raises(TrackingError, match="models:/nope@latest.*not in the registry"):
        run_finetune(config_from_mapping(FinetuneConfig, {**base, "base": "models:/nope@latest"}))


@pytest.mark.ray
def test_bad_storage_and_output_locations_name_what_to_set(store_ray, s3_bucket, tmp_path,
                                                           tracking_uri, minilm_dir):
    from workflows.serving.batch import predict_file
    from workflows.training.contracts import TrainingError
    from workflows.training.finetune import run_finetune
    from workflows.transfer import TransferError

    (tmp_path / "train.jsonl").write_bytes(_jsonl(8, 0))
    base = dict(task="seq-cls", train=str(tmp_path / "train.jsonl"), base=str(minilm_dir),
                tracking_uri=tracking_uri, data_dir=str(tmp_path / "data"))
    with pytest.raises(TrainingError, match=r"nosuch://b/runs: cannot open this location.*s3://"):
        run_finetune(config_from_mapping(FinetuneConfig, {**base, "storage_path": "nosuch://b/runs"}))
    with pytest.raises(TrainingError, match=r"s3://no-such-bucket-4711/runs: bucket "
                                            r"'no-such-bucket-4711' does not exist.*AWS_ENDPOINT_URL"):
        run_finetune(config_from_mapping(FinetuneConfig, {
            **base, "storage_path": "s3://no-such-bucket-4711/runs"}))
    with pytest.raises(TransferError, match=r"--train s3://.*/missing.jsonl: not found"):
        run_finetune(config_from_mapping(FinetuneConfig, {
            **base, "train": f"{s3_bucket}/missing.jsonl"}))
    (tmp_path / "in.csv").write_text("text\nhello\n")
    with pytest.raises(TransferError, match="--output s3://no-such-bucket-4711/p.csv: bucket"):
        predict_file(PredictConfig(model=str(minilm_dir), input=str(tmp_path / "in.csv"),
                                   output="s3://no-such-bucket-4711/p.csv"))


# ---------------------------------------------------------------- the whole path on S3


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pretrain_finetune_predict_with_everything_on_s3(store_ray, s3_bucket, tmp_path,
                                                         tracking_uri, monkeypatch):
    """Pretrain with its run folder on S3 (checkpoints there, rerun resumes from them,
    the model registered), fine-tune from `models:/...@latest` with `--train` on S3 and
    the base reaching the workers through the object store, predict into S3; no secret
    in any param or tag."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from workflows import tracking as T
    from workflows.serving.batch import embed_file, predict_file
    from workflows.run_folder import RESULT_FILE
    from workflows.training.finetune import run_finetune
    from workflows.training.pretrain import PretrainError, run_pretrain

    import os

    monkeypatch.chdir(tmp_path)
    # Secrets the driver holds (S3 keys, MLflow credentials): none may end up in MLflow.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-do-not-log-4711")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-do-not-log-4711")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    bucket = s3_bucket.removeprefix("s3://")
    storage = f"s3://{bucket}/runs"
    build_pretraining_dataset(PrepConfig(
        input=[str(_corpus(tmp_path / "corpus.txt", 200))], output=str(tmp_path / "ds"),
        train_vocab=120, max_seq_len=32, objective="mlm", masking="dynamic", dupe_factor=1,
        val_fraction=0.1, tokenize_workers=1))
    settings = dict(data=str(tmp_path / "ds"), run_name="s3-run", model_size="tiny",
                    num_workers=1, cpus_per_worker=0.5, batch_size=8, lr=1e-3,
                    warmup_steps=1, max_steps=2, checkpoint_every=2, eval_every=0,
                    eval_batches=1, log_every=1, storage_path=storage,
                    tracking_uri=tracking_uri, experiment="s3", register_as="tiny-s3",
                    log_system_metrics=False)
    first = run_pretrain(config_from_mapping(PretrainConfig, settings))
    run_uri = f"s3://{bucket}/runs/s3-run"
    assert first.run_dir == run_uri and first.step == 2
    assert first.model_dir == f"{run_uri}/checkpoint_00000002/model"
    keys = _keys(bucket, "runs/s3-run/")
    assert f"runs/s3-run/checkpoint_00000002/model/model.safetensors" in keys
    assert f"runs/s3-run/{RESULT_FILE}" in keys
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()

    # The driver died after the last checkpoint, before recording the result: the same
    # command, now for 4 steps, resumes from the checkpoint on S3 in the same MLflow run.
    _s3().delete_object(Bucket=bucket, Key=f"runs/s3-run/{RESULT_FILE}")
    second = run_pretrain(config_from_mapping(PretrainConfig, {**settings, "max_steps": 4,
                                                               "checkpoint_every": 4}))
    assert (second.start_step, second.step, second.run_id) == (2, 4, first.run_id)
    assert f"runs/s3-run/checkpoint_00000004/model/model.safetensors" in _keys(bucket, "runs/")
    with pytest.raises(PretrainError, match="already finished"):  # read from S3
        run_pretrain(config_from_mapping(PretrainConfig, {**settings, "max_steps": 4}))
    assert second.model_version == "2"

    # Fine-tune from the registered model; --train on S3. The driver resolves the base
    # into its temp folder, ships the bytes and deletes its copy before training: a
    # worker that opened the driver's path would fail, and nothing is left behind.
    s3 = _s3()
    s3.put_object(Bucket=bucket, Key="tasks/train.jsonl", Body=_jsonl(64, 1))
    s3.put_object(Bucket=bucket, Key="tasks/eval.jsonl", Body=_jsonl(16, 2))
    driver_tmp = tmp_path / "driver-tmp"
    driver_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
    ft = run_finetune(config_from_mapping(FinetuneConfig, dict(
        task="seq-cls", base="models:/tiny-s3@latest", train=f"s3://{bucket}/tasks/train.jsonl",
        eval=f"s3://{bucket}/tasks/eval.jsonl", epochs=1, max_seq_len=32, batch_size=16,
        cpus_per_worker=0.5, storage_path=storage, run_name="ft-s3",
        tracking_uri=tracking_uri, experiment="s3", register_as="ft-s3",
        data_dir=str(tmp_path / "task-data"), log_system_metrics=False, log_every=1)))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert sorted(p.name for p in driver_tmp.iterdir()) == []
    assert ft.model_dir == f"s3://{bucket}/runs/ft-s3/checkpoint_00000004/model"
    assert ft.model_version == "1" and "val_accuracy" in ft.metrics

    # The workers built their model from their node's copy of the shipped base.
    ray = store_ray
    from workflows.transfer import shipped_cache_root

    worker_cache = ray.get(ray.remote(num_cpus=0)(shipped_cache_root).remote())
    shipped = [p for p in Path(worker_cache).iterdir()
               if (p / "model.safetensors").is_file()]
    registered = T.resolve_model("models:/tiny-s3/2", dest=tmp_path / "dl",
                                 tracking_uri=tracking_uri)
    assert any((p / "model.safetensors").read_bytes()
               == (registered / "model.safetensors").read_bytes() for p in shipped)

    # Predict into S3: the output object appears whole, nothing else is left there.
    s3.put_object(Bucket=bucket, Key="in/texts.csv",
                  Body=b"text\nthe red cat sees the old dog .\nthe blue bird finds the quiet city .\n")
    summary = predict_file(PredictConfig(model="models:/ft-s3@latest",
                                         input=f"s3://{bucket}/in/texts.csv",
                                         output=f"s3://{bucket}/out/preds.csv",
                                         tracking_uri=tracking_uri))
    assert summary["rows"] == 2
    assert _keys(bucket, "out/") == ["out/preds.csv"]
    body = s3.get_object(Bucket=bucket, Key="out/preds.csv")["Body"].read().decode()
    assert body.splitlines()[0].startswith("text,") and len(body.splitlines()) == 3
    embedded = embed_file(EmbedConfig(model="models:/ft-s3@latest",
                                      input=f"s3://{bucket}/in/texts.csv",
                                      output=f"s3://{bucket}/out/vectors.parquet",
                                      tracking_uri=tracking_uri))
    assert (embedded["rows"], embedded["dim"]) == (2, 128)  # the tiny preset's width
    assert _keys(bucket, "out/") == ["out/preds.csv", "out/vectors.parquet"]

    # No secret in any param or tag of the runs or the registered versions.
    client = T.client(tracking_uri)
    texts = []
    for run_id in (first.run_id, ft.run_id):
        run = client.get_run(run_id)
        texts += [*run.data.params.values(), *run.data.tags.values()]
    for name, version in (("tiny-s3", "1"), ("tiny-s3", "2"), ("ft-s3", "1")):
        texts += list(client.get_model_version(name, version).tags.values())
    blob = "\n".join(texts)
    assert client.get_run(first.run_id).data.params["storage_path"] == storage
    for value in (secret, "pw-do-not-log-4711", "tok-do-not-log-4711"):
        assert value not in blob
