"""The shape of workflows/: training never imports inference, and inference (predict,
embed) never loads training code."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
