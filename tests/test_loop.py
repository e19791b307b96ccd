"""The worker loop's batch stream and evaluation without Ray: reproducible dynamic masks
(reruns, threads, resume), the MLM-only model, and sharded evaluation whose reduced sums
equal a one-worker evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.masking import MaskingSpec
from workflows.config import LoopSettings
from workflows.training import loop as L
from workflows.training.pretrain import PretrainTask
from workflows.training.step import StepRunner

VOCAB = 60
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def rows(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[CLS], rng.integers(5, VOCAB, int(rng.integers(6, 20))), [SEP]])
            for _ in range(n)]


class FakeShard:
    """What the loop uses of a Ray DataIterator: numpy batches of the Parquet schema, from
    `input_ids` rows or a pyarrow Table."""

    def __init__(self, data) -> None:
        self.data = data if hasattr(data, "column_names") else None
        self.rows = data if self.data is None else range(data.num_rows)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy",
                     drop_last: bool = False, prefetch_batches: int = 0):
        assert batch_format == "numpy"
        for i in range(0, len(self.rows), batch_size):
            n = len(self.rows[i:i + batch_size])
            if drop_last and n < batch_size:
                return
            if self.data is None:
                columns = {"input_ids": list(self.rows[i:i + n])}
            else:
                columns = self.data.slice(i, n).to_pydict()
            yield {k: _objects(v) for k, v in columns.items()}


def _objects(values: list) -> np.ndarray:
    if values and isinstance(values[0], (list, np.ndarray)):
        out = np.empty(len(values), dtype=object)
        out[:] = [np.asarray(v) for v in values]
        return out
    return np.asarray(values)


def task(objective: str = "mlm") -> PretrainTask:
    from bert_core import BertConfig

    config = BertConfig.preset("tiny", vocab_size=VOCAB).to_hf_dict("BertForMaskedLM")
    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP))
    return PretrainTask(model_config=config, init_dir=None, tokenizer_dir="", pad_id=PAD,
                        masking=spec, objective=objective)


def loop_settings(**changes) -> LoopSettings:
    return LoopSettings(**{"batch_size": 4, "seed": 7, "max_steps": 10, "warmup_steps": 0,
                           "eval_batches": 0, **changes})


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
