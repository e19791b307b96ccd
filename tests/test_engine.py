"""The training engine: optimiser, schedule, accumulation and checkpoint state without
Ray; then the real Ray Train loop on a small regression task (not BERT: this tests the
engine's own behaviour, quickly)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import TRUE_W, RegressionTask, batch_of, make_rows
from workflows.config import LoopSettings
from workflows.training.checkpoint import load_checkpoint_state, save_checkpoint
from workflows.training.optim import Lamb, linear_warmup_decay, param_groups
from workflows.training.step import MetricWindow, StepRunner

# ---------------------------------------------------------------- no Ray


def test_schedule_warms_up_then_decays_to_zero():
    f = [linear_warmup_decay(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # decays monotonically
    assert f[99] == pytest.approx(1 / 90) and linear_warmup_decay(100, 10, 100) == 0.0


def test_no_weight_decay_on_bias_and_layernorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, plain = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert decay["adapt"] and not plain["adapt"]  # LAMB's trust ratio on weights only
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model[0].weight), id(model[2].weight)}
    assert ids(plain["params"]) == {id(model[0].bias), id(model[1].weight),
                                    id(model[1].bias), id(model[2].bias)}


def test_lamb_first_step_is_lr_times_weight_norm_and_it_converges():
    # Step 1 of LAMB: the Adam update is sign(g) (bias-corrected), so the step's norm is
    # lr * ||w|| per tensor (the trust ratio), whatever the gradient's scale.
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = Lamb([w], lr=0.1, eps=1e-12)
    w.grad = torch.tensor([1000.0, -0.001])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * 5.0 / 2**0.5 * torch.tensor([1.0, -1.0]), atol=1e-5)

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = Lamb(param_groups(model, 0.0), lr=0.05)
    # LAMB's steps scale with ||w||, so it settles only as the LR decays (as in BERT).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, 0, 300))
    x = torch.randn(256, 8)
    y = x @ torch.as_tensor(TRUE_W) + 0.5
    losses = []
    for _ in range(300):
        loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < 0.01 * losses[0]


def test_gradient_accumulation_equals_one_big_batch():
    rows = make_rows(16, seed=1)
    task = RegressionTask()
    results = []
    for accum, size in ((1, 16), (4, 4)):
        torch.manual_seed(0)
        model = task.build_model()
        loop = LoopSettings(grad_accum=accum, batch_size=size, warmup_steps=0, max_steps=5,
                            lr=0.01, max_grad_norm=0.5)
        runner = StepRunner(model, loop, torch.device("cpu"))
        for _ in range(3):
            for i in range(0, 16, size):
                runner.forward_backward(task, batch_of(rows[i:i + size]))
            assert runner.cycle_done
            info = runner.optimizer_step()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), info))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    norms = [float(info["grad_norm"]) for _, info in results]  # device tensors: read here
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_checkpoint_round_trip_continues_identically(tmp_path, optimizer):
    rows = make_rows(32, seed=2)
    task = RegressionTask()
    loop = LoopSettings(optimizer=optimizer, warmup_steps=2, max_steps=10, lr=0.01)
    torch.manual_seed(0)
    model = task.build_model()
    runner = StepRunner(model, loop, torch.device("cpu"))

    def train(r: StepRunner, steps: range) -> None:
        for s in steps:
            r.forward_backward(task, batch_of(rows[(s % 4) * 8:(s % 4) * 8 + 8]))
            r.optimizer_step()

    train(runner, range(4))
    save_checkpoint(tmp_path, task=task, raw_model=model, runner=runner, rank=0, epoch=1,
                    batches_in_epoch=3, attempt=0)
    train(runner, range(4, 8))

    trainer_state, rank_state = load_checkpoint_state(tmp_path, rank=0)
    assert trainer_state["step"] == 4 and rank_state["batches_in_epoch"] == 3
    assert load_checkpoint_state(tmp_path, rank=1)[1] is None  # no file: restore decides
    resumed_model = task.load_model(tmp_path / "model")
    resumed = StepRunner(resumed_model, loop, torch.device("cpu"))
    resumed.load_state_dict(trainer_state)
    assert resumed.scheduler.get_last_lr() == pytest.approx(
        [0.01 * linear_warmup_decay(4, 2, 10)] * 2)
    train(resumed, range(4, 8))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert json.loads((tmp_path / "trainer_state.json").read_text())["epoch"] == 1


def test_metric_window_turns_correct_and_count_into_accuracy():
    window = MetricWindow()
    window.add(2.0, {"mlm_correct": torch.tensor(3), "mlm_count": 4, "nsp_loss": 1.0}, 10, 2)
    window.add(4.0, {"mlm_correct": 1, "mlm_count": 4, "nsp_loss": 3.0}, 10, 2)
    out = window.summary(world_size=2)
    assert out["loss"] == 3.0 and out["nsp_loss"] == 2.0 and out["mlm_acc"] == 0.5
    assert "mlm_count" not in out and "mlm_correct" not in out and out["tokens_per_s"] > 0


# ---------------------------------------------------------------- real Ray Train


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
import ray
import helpers as te
from workflows.config import LoopSettings
from workflows.training.engine import run_folder, run_training

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.cloudpickle.register_pickle_by_value(te)  # workers cannot import the tests folder
loop = LoopSettings(num_workers=1, cpus_per_worker=0.5, batch_size=16, lr=0.1, warmup_steps=5,
                    max_steps=120, checkpoint_every=20, keep_checkpoints=2, eval_every=0,
                    log_every=10, storage_path={runs!r})
r = run_training(te.RegressionTask(sleep_s=0.1), loop, run=run_folder(loop, "drv"),
                 datasets={{"train": ray.data.from_items(te.make_rows(512, seed=3))}})
print("RESULT", json.dumps({{"step": r.step, "start_step": r.start_step, "attempt": r.attempt}}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_after_the_driver_is_killed_resumes_from_its_checkpoint(tmp_path):
    """The driver (and its private local Ray) is SIGKILLed after a checkpoint; running the
    same thing again resumes from that checkpoint instead of starting over."""
    import os
    import signal
    import subprocess
    import time

    runs = tmp_path / "runs"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), runs=str(runs)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    first_log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below)
    first = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                             stdout=first_log, stderr=subprocess.STDOUT)
    snapshot = runs / "drv" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600

    def registered() -> str:  # the latest checkpoint Ray Train has recorded
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
    while registered() < "checkpoint_00000040":
        assert first.poll() is None, (
            "the first driver ended before its second checkpoint:\n"
            + (tmp_path / "first.log").read_text()[-3000:])
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
    first.wait(timeout=60)
    first_log.close()

    again = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(next(line for line in again.stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["step"] == 120 and result["attempt"] == 1
    assert result["start_step"] >= 40 and result["start_step"] % 20 == 0
