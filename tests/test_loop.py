"""The worker loop's batch stream and evaluation without Ray: reproducible dynamic masks
(reruns, threads, resume), the MLM-only model, and sharded evaluation whose reduced sums
equal a one-worker evaluation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.helpers import FakeShard, loop_settings, token_rows as rows, tiny_pretrain_task as task
from workflows.config import LoopSettings
from workflows.training import loop as L
from workflows.training.step import StepRunner

def masks(stream, n: int) -> list[tuple[int, int, np.ndarray]]:
    out = []
    for _ in range(n):
        epoch, position, batch = next(stream)
        out.append((epoch, position, batch["labels"].numpy()))
    return out


def test_dynamic_masks_are_a_function_of_seed_epoch_batch_and_rank():
    shard, t, cpu = FakeShard(rows(40)), task(), torch.device("cpu")
    run = lambda **kw: masks(L.train_batches(shard, t, loop_settings(**kw), 0, 1, 0, 0, cpu), 25)  # noqa: E731
    first, again = run(), run()
    # 10 batches an epoch: epochs 0, 1, 2 with their positions, identical on a rerun.
    assert [(e, p) for e, p, _ in first][9:12] == [(0, 10), (1, 1), (1, 2)]
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(first, again))
    # Each epoch masks the same rows afresh; another seed gives other masks.
    assert not np.array_equal(first[0][2], first[10][2])
    assert not np.array_equal(first[0][2], run(seed=8)[0][2])
    # A resume at (epoch 1, 3 batches consumed) continues with the masks of the full run.
    resumed = masks(L.train_batches(shard, t, loop_settings(), 0, 1, 1, 3, cpu), 5)
    assert [(e, p) for e, p, _ in resumed] == [(e, p) for e, p, _ in first[13:18]]
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(resumed, first[13:18]))
    # The worker count does not enter: rank 0 of two workers, given the same rows, masks
    # them as a single worker does (which rows a rank gets is Ray Data's split).
    two = masks(L.train_batches(shard, t, loop_settings(), 0, 2, 0, 0, cpu), 3)
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(two, first[:3]))


def test_mlm_only_task_trains_every_parameter():
    """Without the sentence head and pooler every parameter gets a gradient, which DDP
    needs from the second step on."""
    t = task("mlm")
    model = t.build_model()
    assert not hasattr(model, "nsp") and model.bert.pooler is None
    batch = t.collate(next(FakeShard(rows(8)).iter_batches(8)), np.random.default_rng(0))
    loss, metrics = t.compute_loss(model, batch)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert float(metrics["mlm_count"]) > 0


def test_sharded_evaluation_sums_equal_one_worker_evaluation(monkeypatch):
    t, cpu = task(), torch.device("cpu")
    torch.manual_seed(0)
    model = t.build_model()
    settings = loop_settings()
    runner = StepRunner(model, settings, cpu)
    shard = FakeShard(rows(37, seed=3))  # 10 batches, the last one short
    reduced: list[dict[str, float]] = []

    def record(sums, device):
        reduced.append(dict(sums))
        return sums

    monkeypatch.setattr(L, "all_reduce_sums", record)
    single = L.evaluate(t, model, shard, settings, runner, cpu, rank=0, world=1)
    parts = [L.evaluate(t, model, shard, settings, runner, cpu, rank=r, world=3)
             for r in range(3)]
    whole, shares = reduced[0], reduced[1:]
    added = {k: sum(s[k] for s in shares) for k in whole}
    assert added == pytest.approx(whole, rel=1e-9)
    assert whole["mlm_count"] > 0 and all(s["mlm_count"] < whole["mlm_count"] for s in shares)
    assert {f"val_{k}": v for k, v in t.eval_metrics(added).items()} == pytest.approx(single)
    assert parts[0] != single  # unreduced, a share alone is not the whole


def test_all_reduce_sums_outside_a_process_group_is_the_identity():
    assert L.all_reduce_sums({"a": 1.5, "b": 2.0}, torch.device("cpu")) == {"a": 1.5, "b": 2.0}


def test_rank_zero_opens_the_run_it_logs_into_and_a_restart_finds_it_again(tmp_path):
    """A sweep trial's RunTracking names no run: rank 0 opens it (tags, params), logs into
    it, and a restarted worker group (a second RunLogger) logs into the same run."""
    from workflows import tracking as T
    from workflows.training.contracts import RunTracking, TrainingError

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    opening = dict(experiment="sweeps", run_name="s-0001", tags={"bertflow.sweep_trial": "s"},
                   params={"lr": 3e-5})
    for step in (1, 2):  # the first attempt, then the restarted worker group
        logger = L.RunLogger(RunTracking(uri, None, False, opening=opening))
        logger.log({"loss": 1.0 / step}, step)
        logger.close()
    c = T.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("sweeps").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["bertflow.sweep_trial"] == "s" and run.data.params["lr"] == "3e-05"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    with pytest.raises(TrainingError, match="run_id or an opening"):
        RunTracking(uri, None).resolve()


# ---------------------------------------------------------------- Ray Data's shard


class DrawTask:
    """Collate keeps the rows and one number drawn from the batch's generator."""

    def collate(self, batch, rng):
        return {"row": torch.as_tensor(batch["row"]),
                "draw": torch.tensor([rng.integers(1 << 30)])}


def five_rows() -> FakeShard:
    return FakeShard(pa.table({"row": list(range(5))}))


def test_batches_go_epoch_after_epoch_reseeded_and_skip_only_on_resume():
    loop = LoopSettings(batch_size=2, max_steps=10, warmup_steps=0, seed=3)
    cpu = torch.device("cpu")
    stream = L.train_batches(five_rows(), DrawTask(), loop, rank=1, world=2, epoch=0,
                             skip=1, device=cpu)
    got = [next(stream) for _ in range(4)]
    # Epoch 0 resumed after its first batch; 5 rows make 2 full batches per epoch.
    assert [(e, pos, b["row"].tolist()) for e, pos, b in got] == [
        (0, 2, [2, 3]), (1, 1, [0, 1]), (1, 2, [2, 3]), (2, 1, [0, 1])]
    # Masks come from batch_rng(seed, epoch, batch index, rank): the same after a resume.
    fresh = L.train_batches(five_rows(), DrawTask(), loop, rank=1, world=2, epoch=1, skip=0,
                            device=cpu)
    assert next(fresh)[2]["draw"].item() == got[1][2]["draw"].item()
    assert got[1][2]["draw"].item() != got[3][2]["draw"].item()


def test_a_shard_smaller_than_a_batch_is_an_error_that_says_why():
    loop = LoopSettings(batch_size=8, max_steps=10, warmup_steps=0)
    stream = L.train_batches(five_rows(), DrawTask(), loop, rank=0, world=2, epoch=0, skip=0,
                             device=torch.device("cpu"))
    with pytest.raises(L.TrainingError, match="fewer rows than --num-workers x --batch-size"):
        next(stream)
