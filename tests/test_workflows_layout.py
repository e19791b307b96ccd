"""The shape of workflows/: training never imports inference, and the batch stream of the
training loop (epochs, reseeding, resume skipping) behaves without Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from workflows.config import LoopSettings
from workflows.training.contracts import TrainingError
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


PREDICT_AND_EMBED = """
import json, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
from workflows.config import EmbedConfig, PredictConfig
from workflows.serving.batch import embed_file, predict_file
predict_file(PredictConfig(model={run!r}, input={csv!r}, output={out!r}))
embed_file(EmbedConfig(model={run!r}, input={csv!r}, output={vectors!r}))
print("TRAINING", json.dumps(sorted(m for m in sys.modules if m.startswith("workflows.training"))))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_predict_and_embed_from_a_run_folder_import_no_training_module(minilm_dir, tmp_path):
    """Finding the model in a Ray Train run folder (its latest trusted checkpoint) is
    inference's business too: `bertflow predict`/`embed` on a run folder must not load
    the training code (optimizers, the step, the checkpoint writer)."""
    import shutil

    import pandas as pd

    from workflows.training.checkpoint import write_completion_marker

    run = tmp_path / "runs" / "r1"
    ckpt = run / "checkpoint_00000005"
    shutil.copytree(minilm_dir, ckpt / "model")
    write_completion_marker(ckpt)
    pd.DataFrame({"text": ["a fine day", "rain again", "hello"]}).to_csv(tmp_path / "in.csv",
                                                                         index=False)
    code = PREDICT_AND_EMBED.format(run=str(run), csv=str(tmp_path / "in.csv"),
                                    out=str(tmp_path / "out.jsonl"),
                                    vectors=str(tmp_path / "vectors.parquet"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_json(tmp_path / "out.jsonl", lines=True)) == 3
    assert len(pd.read_parquet(tmp_path / "vectors.parquet")["embedding"][0]) == 384
    line = [x for x in proc.stdout.splitlines() if x.startswith("TRAINING ")][-1]
    assert line == "TRAINING []"


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
