"""Elastic pretraining on a real two-node Ray cluster on this machine: `bertflow pretrain
--num-workers 1:2` keeps training when the node of one of its two workers dies, on one
worker with the same global batch, and ends with the model an uninterrupted one-worker
run trains (dropout 0, static masks), after a resume on another worker count; a resume
asking for another global batch is refused, naming what changed."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import services
from tests.helpers import templated_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]

MAX_STEPS, CHECKPOINT_EVERY = 200, 20


def bertflow(*args: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *args],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> None:
    assert proc.wait(timeout=timeout_s) == 0, log.read_text()[-4000:]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    result = json.loads((run_dir / "bertflow_result.json").read_text())
    return load_file(str(Path(result["model_dir"]) / "model.safetensors"))


def test_elastic_run_loses_a_node_goes_on_with_one_worker_and_ends_as_one_worker_would(
        tmp_path):
    with services.cluster_lock():  # one multi-process Ray cluster on the machine at a time
        _elastic_run(tmp_path)


def _elastic_run(tmp_path: Path) -> None:
    from bert_core import BertConfig
    from workflows.config import LoopSettings, ServerConfig
    from workflows.ops import server
    from workflows.run_folder import RunFolder, committed_by_ray
    from workflows.training.checkpoint import check_resume
    from workflows.training.contracts import TrainingError
    from workflows.training.engine import saved_data_order
    from workflows.training.loop import data_order

    token = secrets.token_hex(32)  # every process of the cluster gets it explicitly
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    headers = {"Authorization": f"Bearer {token}"}
    head = services.start_ray_head(num_cpus=1, env={**auth, **services.RAY_FAST_FAILURE_ENV})
    node = services.start_ray_node(head.gcs_address, 1, tmp_path / "node.log",
                                   env={**auth, **services.RAY_FAST_FAILURE_ENV})
    (tmp_path / "store").mkdir()
    server_log = open(tmp_path / "server.log", "wb")
    tracker, url = server.start_server(  # rank 0 may log from either node: a server
        ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}",
                     port=services.free_ports()[0], workers=1),
        timeout_s=300, stdout=server_log, stderr=server_log)
    try:
        env = {**services.ray_env(auth),
               # a driver joining the cluster waits for the GCS; on a loaded machine 60 s
               # (Ray's default) is not always enough
               "RAY_gcs_server_request_timeout_seconds": "300",
               "MLFLOW_TRACKING_URI": url}
        corpus = templated_corpus(tmp_path / "corpus.txt", n_docs=600)
        finish(bertflow("prep", "--input", str(corpus), "--output", str(tmp_path / "ds"),
                        "--train-vocab", "200", "--max-seq-len", "64", "--dupe-factor", "1",
                        "--val-fraction", "0", "--num-parts", "3",
                        "--address", head.gcs_address, log=tmp_path / "prep.log", env=env),
               tmp_path / "prep.log")
        config = BertConfig.preset("tiny", vocab_size=200, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0).to_hf_dict("BertForPreTraining")
        config.pop("vocab_size")
        (tmp_path / "tiny.json").write_text(json.dumps(config))
        common = ["--data", str(tmp_path / "ds"), "--model-config", str(tmp_path / "tiny.json"),
                  "--address", head.gcs_address, "--cpus-per-worker", "1",
                  "--batch-size", "4", "--global-batch-size", "16", "--lr", "1e-3",
                  "--warmup-steps", "5", "--max-steps", str(MAX_STEPS),
                  "--checkpoint-every", str(CHECKPOINT_EVERY), "--eval-every", "0",
                  "--log-every", "10", "--seed", "3", "--storage-path", str(tmp_path / "runs"),
                  "--no-log-system-metrics"]
        deadline, starts = time.monotonic() + 600, 1
        while len(services.ray_nodes_alive(head.dashboard, headers)) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-2000:]
            if node.poll() is not None and starts < 4:  # Ray gives a raylet 30 s to register
                services.kill_tree(node)
                node, starts = services.start_ray_node(
                    head.gcs_address, 1, tmp_path / "node.log",
                    env={**auth, **services.RAY_FAST_FAILURE_ENV}), starts + 1
            time.sleep(1)

        # 1. Two workers, one per node; the second node dies after a committed checkpoint.
        log = tmp_path / "elastic.log"
        elastic = bertflow("pretrain", *common, "--run-name", "elastic", "--num-workers", "1:2",
                           log=log, env=env)
        run_dir = tmp_path / "runs" / "elastic"
        while not committed_by_ray(run_dir):
            assert elastic.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        killed = services.kill_tree(node)
        finish(elastic, log)
        result = json.loads((run_dir / "bertflow_result.json").read_text())
        assert killed >= 2 and result["step"] == MAX_STEPS
        assert result["attempt"] >= 1 and 0 < result["start_step"] < MAX_STEPS, result

        # 2. The same run, uninterrupted, on one worker from the start.
        log = tmp_path / "single.log"
        finish(bertflow("pretrain", *common, "--run-name", "single", "--num-workers", "1",
                        log=log, env=env), log)
        a, b = weights(run_dir), weights(tmp_path / "runs" / "single")
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        moved = max(float(a[k].float().std()) for k in a)
        assert worst < 1e-4, f"elastic and one-worker models differ by {worst}"
        assert moved > 1e-2  # the models trained: a real comparison

        # 3. Resuming with another global batch would name other rows: refused.
        saved = saved_data_order(RunFolder.of(tmp_path / "runs", "elastic"))
        assert saved["global_batch"] == 16 and saved["canonical"]
        changed = LoopSettings(batch_size=4, global_batch_size=8, seed=3, num_workers=2)
        with pytest.raises(TrainingError, match=r"global_batch 16 -> 8"):
            check_resume(saved, data_order(changed, True, 2), "the elastic run")
    finally:
        if node.poll() is None:
            services.kill_tree(node)
        services.stop_ray(head.proc)
        server.stop_server(tracker)
        server_log.close()
