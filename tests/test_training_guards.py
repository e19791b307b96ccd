"""Guards of the training loop (no Ray): only complete or committed checkpoints are
trusted, and a diverged fp16 run stops with a clear error instead of skipping every step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import RegressionTask, batch_of, make_rows
from workflows.config import LoopSettings
from workflows.run_folder import COMPLETE_FILE, RAY_SNAPSHOT, find_model_folder, latest_checkpoint
from workflows.training.checkpoint import save_checkpoint
from workflows.training.contracts import TrainingError
from workflows.training.step import StepRunner


def write_checkpoint(run_dir, step: int):
    """A real checkpoint at `step` as save_checkpoint writes it (rank 0)."""
    task = RegressionTask()
    model = task.build_model()
    runner = StepRunner(model, LoopSettings(max_steps=1000), torch.device("cpu"))
    runner.step = step
    dest = run_dir / f"checkpoint_{step:08d}"
    save_checkpoint(dest, task=task, raw_model=model, runner=runner, rank=0, epoch=0,
                    batches_in_epoch=step, attempt=0)
    return dest


def test_only_complete_or_ray_committed_checkpoints_are_trusted(tmp_path):
    run = tmp_path / "run"
    good = write_checkpoint(run, 20)
    assert (good / COMPLETE_FILE).is_file()
    assert latest_checkpoint(run) == good

    # A later checkpoint cut short (a crash while it was written): its weights are
    # truncated, so it does not match its marker.
    cut = write_checkpoint(run, 40)
    weights = cut / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Another with no marker at all, e.g. copied in by hand or from an older layout.
    stray = run / "checkpoint_00000060"
    shutil.copytree(good, stray)
    (stray / COMPLETE_FILE).unlink()
    (stray / "trainer_state.json").write_text(json.dumps({"step": 60}))
    assert latest_checkpoint(run) == good
    assert find_model_folder(run) == good / "model"

    # What Ray Train committed is trusted even without bertflow's marker.
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_00000020"},
        {"checkpoint_dir_name": "checkpoint_00000060"}]}))
    assert latest_checkpoint(run) == stray


def test_a_diverged_fp16_run_logs_skipped_steps_and_stops(tmp_path):
    class Diverged(RegressionTask):
        def compute_loss(self, model, batch):
            loss, metrics = super().compute_loss(model, batch)
            return loss * float("nan"), metrics

    rows = make_rows(8, seed=1)
    loop = LoopSettings(precision="fp16", use_gpu=True, max_nonfinite_steps=3, max_steps=100)
    runner = StepRunner(RegressionTask().build_model(), loop, torch.device("cpu"))
    runner.forward_backward(RegressionTask(), batch_of(rows))  # a finite step first
    runner.optimizer_step()
    before = runner.skipped_steps  # the first scale (65536) may overflow a finite step too
    diverged = Diverged()
    infos = []
    with pytest.raises(TrainingError, match="not finite for 3 optimizer steps in a row"):
        for _ in range(10):
            runner.forward_backward(diverged, batch_of(rows))
            infos.append(runner.optimizer_step())
    assert [i["scaler_skipped_steps"] for i in infos] == [before + 1, before + 2]
    assert infos[1]["loss_scale"] < infos[0]["loss_scale"]
    assert runner.skipped_steps == before + 3
    assert runner.state_dict()["skipped_steps"] == before + 3


def test_fp16_tolerates_isolated_overflows():
    rows = make_rows(8, seed=1)
    loop = LoopSettings(precision="fp16", use_gpu=True, max_nonfinite_steps=2, max_steps=100)
    runner = StepRunner(RegressionTask().build_model(), loop, torch.device("cpu"))

    class Sometimes(RegressionTask):
        calls = 0

        def compute_loss(self, model, batch):
            loss, metrics = super().compute_loss(model, batch)
            Sometimes.calls += 1
            return (loss * float("inf") if Sometimes.calls % 2 else loss), metrics

    for _ in range(8):  # every other step overflows: never two in a row
        runner.forward_backward(Sometimes(), batch_of(rows))
        info = runner.optimizer_step()
    assert info["scaler_skipped_steps"] >= 4.0 and runner.step == 8
