"""The shape of workflows/: training never imports inference, and the batch stream of the
training loop (epochs, reseeding, resume skipping) behaves without Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from workflows.config import LoopSettings
from workflows.training.engine import TrainingError
from workflows.training.loop import train_batches


def test_the_training_path_does_not_import_the_inference_modules():
    code = ("import sys\n"
            "import workflows.training.pretrain, workflows.training.finetune\n"
            "import workflows.training.finetune_task, workflows.training.loop\n"
            "print(sorted(m for m in sys.modules if m.startswith('workflows.serving')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


class FakeShard:
    """A Ray DataIterator's numpy `iter_batches` over `n` rows numbered 0..n-1."""

    def __init__(self, n: int) -> None:
        self.n = n

    def iter_batches(self, batch_size, batch_format="numpy", drop_last=False, **_):
        assert batch_format == "numpy"
        for i in range(0, self.n - (self.n % batch_size if drop_last else 0), batch_size):
            yield {"row": np.arange(i, min(i + batch_size, self.n))}


class DrawTask:
    """Collate keeps the rows and one number drawn from the batch's generator."""

    def collate(self, batch, rng):
        return {"row": torch.as_tensor(batch["row"]),
                "draw": torch.tensor([rng.integers(1 << 30)])}


def test_batches_go_epoch_after_epoch_reseeded_and_skip_only_on_resume():
    loop = LoopSettings(batch_size=2, max_steps=10, warmup_steps=0, seed=3)
    stream = train_batches(FakeShard(5), DrawTask(), loop, rank=1, world=2, epoch=0,
                           skip=1, device=torch.device("cpu"))
    got = [next(stream) for _ in range(4)]
    # Epoch 0 resumed after its first batch; 5 rows make 2 full batches per epoch.
    assert [(e, pos, b["row"].tolist()) for e, pos, b in got] == [
        (0, 2, [2, 3]), (1, 1, [0, 1]), (1, 2, [2, 3]), (2, 1, [0, 1])]
    # Masks come from batch_rng(seed, epoch, batch index, rank): the same after a resume.
    fresh = train_batches(FakeShard(5), DrawTask(), loop, rank=1, world=2, epoch=1, skip=0,
                          device=torch.device("cpu"))
    assert next(fresh)[2]["draw"].item() == got[1][2]["draw"].item()
    assert got[1][2]["draw"].item() != got[3][2]["draw"].item()


def test_a_shard_smaller_than_a_batch_is_an_error_that_says_why():
    loop = LoopSettings(batch_size=8, max_steps=10, warmup_steps=0)
    stream = train_batches(FakeShard(5), DrawTask(), loop, rank=0, world=2, epoch=0, skip=0,
                           device=torch.device("cpu"))
    with pytest.raises(TrainingError, match="fewer rows than --num-workers x --batch-size"):
        next(stream)
