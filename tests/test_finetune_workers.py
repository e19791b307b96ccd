"""Fine-tuning on two Ray Train workers is the fine-tuning of one: a real run of
`run_finetune` on 1 and on 2 workers (0.5 CPU each) of a tiny base, for QA, whose
evaluation is the hardest to shard (a question's windows fall to several ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest

import finetune_data as D

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_workers_evaluate_exactly_and_train_as_one_worker(tmp_path, minilm_dir, ray_local):
    """Every rank evaluates its share and the shares are gathered: the evaluation before
    training equals one worker's exactly, every question decoded. The train rows follow
    the canonical batch order (the same global batches on any worker count): the two runs
    make the same steps and end with the same model, up to float noise."""
    from safetensors.torch import load_file

    from workflows.training.finetune import run_finetune

    base = D.write_tiny_base(tmp_path / "base", minilm_dir)
    D.write_squad(tmp_path / "train.json", 30, seed=7, v2=True)
    D.write_squad(tmp_path / "eval.json", 10, seed=8, v2=True)

    def finetune(workers: int):
        return run_finetune(D.finetune_config(
            tmp_path, minilm_dir, "qa", tmp_path / "train.json", tmp_path / "eval.json",
            base=str(base), run_name=f"qa-{workers}", num_workers=workers,
            cpus_per_worker=0.5, max_seq_len=28, doc_stride=8, batch_size=8,
            global_batch_size=16, epochs=2, lr=1e-3, log_every=10))

    one, two = finetune(1), finetune(2)
    before = two.history["before training"]
    assert before == one.history["before training"]  # exactly
    assert before["total"] == 40 and before["loss"] > 0  # 10 paragraphs x 4 questions
    assert one.steps == two.steps > 0
    assert list(two.history) == list(one.history)  # evaluated at the same steps
    for row in list(one.history)[1:]:
        assert two.history[row]["loss"] == pytest.approx(one.history[row]["loss"], rel=1e-3)
    assert one.metrics["val_loss"] < before["loss"]  # trained: the comparison means something
    a, b = (load_file(str(Path(r.model_dir) / "model.safetensors")) for r in (one, two))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"the 1- and 2-worker models differ by {worst}"
