"""Checkpoints of the training loop: what one holds, how a worker writes its part, and how
a worker restarts from one.

A checkpoint is one folder (Ray Train keeps the latest `keep_checkpoints`):
    model/               the task's model folder (safetensors, config, tokenizer)
    trainer_state.pt     optimizer, scheduler, scaler, step (torch.save of tensors and
                         plain values; read back with torch.load(weights_only=True))
    trainer_state.json   step, epoch, data position, attempt (human-readable)
    rank_<r>.pt          each worker's torch RNG state and data position
    bertflow_checkpoint.json   written last by rank 0: every file it wrote, with its size

Which checkpoints are trusted, and the names of the files, are `workflows.run_folder`
(read without torch: inference finds models in run folders too).

Resume: the workers restart from the latest checkpoint with its model, optimizer,
scheduler and scaler, at its step, and each worker continues after the micro-batches of
the current epoch it had consumed (`Resume.epoch`, `Resume.skip`; the batch stream in
workflows.training.loop seeks there, see workflows.training.rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workflows.run_folder import COMPLETE_FILE, MODEL_ARTIFACT

if TYPE_CHECKING:
    from workflows.training.step import StepRunner


def save_checkpoint(dest: Path, *, task: Any, raw_model: nn.Module | None,
                    runner: StepRunner | None, rank: int, epoch: int,
                    batches_in_epoch: int, attempt: int) -> None:
    """Write this rank's part of a checkpoint into `dest` (rank 0 writes model + state)."""
    dest.mkdir(parents=True, exist_ok=True)
    torch.save({"torch_rng": torch.get_rng_state(), "epoch": epoch,
                "batches_in_epoch": batches_in_epoch}, dest / f"rank_{rank}.pt")
    if rank == 0:
        assert task is not None and raw_model is not None and runner is not None
        task.save_model(raw_model, dest / MODEL_ARTIFACT)
        torch.save(runner.state_dict(), dest / "trainer_state.pt")
        (dest / "trainer_state.json").write_text(json.dumps(
            {"step": runner.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "attempt": attempt}, indent=2))
        write_completion_marker(dest)


def write_completion_marker(dest: Path) -> None:
    """Record every file of the checkpoint with its size, as the last file written (the
    sizes make it independent of the order in which storage receives the files)."""
    files = {p.relative_to(dest).as_posix(): p.stat().st_size
             for p in sorted(dest.rglob("*")) if p.is_file() and p.name != COMPLETE_FILE}
    tmp = dest / (COMPLETE_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(dest / COMPLETE_FILE)


def load_checkpoint_state(src: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, this rank's state) from a checkpoint; only tensors and plain values
    are read (weights_only=True). A rank missing from the checkpoint (the run was resumed
    with more workers) takes rank 0's data position."""
    trainer = torch.load(src / "trainer_state.pt", weights_only=True, map_location="cpu")
    info = json.loads((src / "trainer_state.json").read_text())
    rank_file = src / f"rank_{rank}.pt"
    if not rank_file.is_file():
        rank_file = src / "rank_0.pt"
    rank_state = torch.load(rank_file, weights_only=True)
    trainer["attempt"] = int(info.get("attempt", 0))
    return trainer, rank_state


@dataclass
class Resume:
    """Where a worker starts: its model, and from a checkpoint the trainer state, the
    epoch, the micro-batches of that epoch already consumed, and the attempt number."""

    model: nn.Module
    trainer_state: dict[str, Any] | None = None
    epoch: int = 0
    skip: int = 0
    attempt: int = 0

    @property
    def resumed(self) -> bool:
        return self.trainer_state is not None


def restore(checkpoint: Any, task: Any, rank: int) -> Resume:
    """A new model from the task, or everything a Ray Train `checkpoint` holds for `rank`
    (the torch RNG state is restored here, so dropout continues as it would have)."""
    if checkpoint is None:
        return Resume(task.build_model())
    with checkpoint.as_directory() as d:
        trainer_state, rank_state = load_checkpoint_state(Path(d), rank)
        model = task.load_model(Path(d) / MODEL_ARTIFACT)
    torch.set_rng_state(rank_state["torch_rng"])
    return Resume(model, trainer_state, epoch=int(rank_state["epoch"]),
                  skip=int(rank_state["batches_in_epoch"]),
                  attempt=trainer_state["attempt"] + 1)
