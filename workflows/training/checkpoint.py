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
from workflows.training.contracts import TrainingError

if TYPE_CHECKING:
    from workflows.training.step import StepRunner


def rank_state_now(epoch: int, batches_in_epoch: int) -> dict[str, Any]:
    """This rank's part of a checkpoint as of now (its `rank_<r>.pt`): the RNG states
    (torch, and CUDA's once initialised) and the data position."""
    rng: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "epoch": epoch,
                           "batches_in_epoch": batches_in_epoch}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(dest: Path, *, task: Any, raw_model: nn.Module | None,
                    runner: StepRunner | None, rank: int, epoch: int,
                    batches_in_epoch: int, attempt: int,
                    data: dict[str, Any] | None = None,
                    rank_state: dict[str, Any] | None = None) -> None:
    """Write this rank's part of a checkpoint into `dest` (rank 0 writes model + state).

    `batches_in_epoch` is the data position: optimizer steps done in `epoch` when the run
    reads a canonical order (`data["order"]`, training/rows.py: the same on every rank),
    else this rank's micro-batches consumed. `data` describes the order the position
    belongs to (global batch, micro-batch, seed): a resume checks it (`check_resume`).
    `rank_state` is `rank_state_now(...)` taken earlier, for a checkpoint written while
    training went on (training/async_checkpoint.py); default: taken now. `runner` is
    anything with `.step` and `.state_dict()`."""
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state or rank_state_now(epoch, batches_in_epoch), dest / f"rank_{rank}.pt")
    if rank == 0:
        assert task is not None and raw_model is not None and runner is not None
        task.save_model(raw_model, dest / MODEL_ARTIFACT)
        torch.save(runner.state_dict(), dest / "trainer_state.pt")
        (dest / "trainer_state.json").write_text(json.dumps(
            {"step": runner.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "attempt": attempt, "data": data}, indent=2))
        write_completion_marker(dest)


def write_completion_marker(dest: Path) -> None:
    """Record every file of the checkpoint with its size, as the last file written (the
    sizes make it independent of the order in which storage receives the files)."""
    files = {p.relative_to(dest).as_posix(): p.stat().st_size
             for p in sorted(dest.rglob("*")) if p.is_file() and p.name != COMPLETE_FILE}
    tmp = dest / (COMPLETE_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(dest / COMPLETE_FILE)


def load_checkpoint_state(src: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer state, this rank's state or None when the checkpoint has no file for
    `rank`: the run was resumed with more workers); only tensors and plain values are
    read (weights_only=True)."""
    trainer = torch.load(src / "trainer_state.pt", weights_only=True, map_location="cpu")
    info = json.loads((src / "trainer_state.json").read_text())
    rank_file = src / f"rank_{rank}.pt"
    rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else None
    trainer["attempt"] = int(info.get("attempt", 0))
    trainer["info"] = info
    return trainer, rank_state


def check_resume(saved: dict[str, Any] | None, wanted: dict[str, Any], where: str) -> None:
    """Refuse to resume a checkpoint whose data order (`saved`, trainer_state.json's
    "data") is not the one this run would read (`wanted`): the position would name other
    rows. Raises TrainingError naming what changed and how to go on."""
    if not saved:
        return
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items()))
        raise TrainingError(
            f"{where} was written with another data order ({what}): resuming there would "
            f"train on other rows than the checkpoint's position names. Keep the global "
            f"batch (--global-batch-size, or --batch-size x --num-workers x --grad-accum as "
            f"before) and --batch-size, --seed as they were; or start a new --run-name")


@dataclass
class Resume:
    """Where a worker starts: its model, and from a checkpoint the trainer state, the
    epoch, the data position in it (see save_checkpoint), the attempt number and the
    checkpoint's data order."""

    model: nn.Module
    trainer_state: dict[str, Any] | None = None
    epoch: int = 0
    skip: int = 0
    attempt: int = 0
    data: dict[str, Any] | None = None

    @property
    def resumed(self) -> bool:
        return self.trainer_state is not None


def restore(checkpoint: Any, task: Any, rank: int, seed: int = 0) -> Resume:
    """A new model from the task, or everything a Ray Train `checkpoint` holds for `rank`.

    The rank's RNG states (torch, and CUDA's) are restored here, so dropout continues as
    it would have. A canonical data order (training/rows.py) gives every rank the same
    position, from trainer_state.json; a rank the checkpoint had no file for (more
    workers now) seeds its RNG from (seed, rank, step). Without a canonical order the
    position is the rank's own (rank 0's for a new rank)."""
    if checkpoint is None:
        return Resume(task.build_model())
    with checkpoint.as_directory() as d:
        trainer_state, rank_state = load_checkpoint_state(Path(d), rank)
        model = task.load_model(Path(d) / MODEL_ARTIFACT)
        if rank_state is None and not (trainer_state["info"].get("data") or {}).get("canonical"):
            rank_state = torch.load(Path(d) / "rank_0.pt", weights_only=True)
    info = trainer_state.pop("info")
    data = info.get("data")
    if rank_state is not None:
        torch.set_rng_state(rank_state["torch_rng"])
        if rank_state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["cuda_rng"])
    else:
        torch.manual_seed(seed + 1_000_003 * (rank + 1) + int(info.get("step", 0)))
    if (data or {}).get("canonical"):
        epoch, skip = int(info["epoch"]), int(info["batches_in_epoch"])
    else:
        epoch, skip = int(rank_state["epoch"]), int(rank_state["batches_in_epoch"])
    return Resume(model, trainer_state, epoch=epoch, skip=skip,
                  attempt=trainer_state["attempt"] + 1, data=data)
