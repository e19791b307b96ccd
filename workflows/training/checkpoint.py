"""Checkpoints of the training loop: what one holds, how a worker writes its part, and how
a worker restarts from one.

A checkpoint is one folder (Ray Train keeps the latest `keep_checkpoints`):
    model/               the task's model folder (safetensors, config, tokenizer)
    trainer_state.pt     optimizer, scheduler, scaler, step (torch.save of tensors and
                         plain values; read back with torch.load(weights_only=True))
    trainer_state.json   step, epoch, data position, attempt (human-readable)
    rank_<r>.pt          each worker's torch RNG state and data position
    bertflow_checkpoint.json   written last by rank 0: every file it wrote, with its size

Which checkpoints are trusted (`trusted_checkpoints`, `latest_checkpoint`): those Ray
Train committed (listed in the run folder's checkpoint_manager_snapshot.json) and those
whose completion marker lists files that are all there at their size. A `checkpoint_*`
folder left half-written by a crash, or dropped into the run folder by hand, is neither.
These checks read the run folder through pyarrow.fs (data_prep.storage), so they work the
same on a local folder and on object storage (`--storage-path s3://...`); they return
Paths for a local run folder and URIs for a remote one.

Resume: the workers restart from the latest checkpoint with its model, optimizer,
scheduler and scaler, at its step, and each worker continues after the micro-batches of
the current epoch it had consumed (`Resume.epoch`, `Resume.skip`; the batch stream in
workflows.training.loop seeks there, see workflows.training.rows).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
        task.save_model(raw_model, dest / "model")
        torch.save(runner.state_dict(), dest / "trainer_state.pt")
        (dest / "trainer_state.json").write_text(json.dumps(
            {"step": runner.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "attempt": attempt}, indent=2))
        write_completion_marker(dest)


COMPLETE_FILE = "bertflow_checkpoint.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def write_completion_marker(dest: Path) -> None:
    """Record every file of the checkpoint with its size, as the last file written (the
    sizes make it independent of the order in which storage receives the files)."""
    files = {p.relative_to(dest).as_posix(): p.stat().st_size
             for p in sorted(dest.rglob("*")) if p.is_file() and p.name != COMPLETE_FILE}
    tmp = dest / (COMPLETE_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(dest / COMPLETE_FILE)


Where = Any  # a local path (str | Path), a URI, or a data_prep.storage.Location


def _loc(where: Where) -> Any:
    from data_prep.storage import Location, open_location

    return where if isinstance(where, Location) else open_location(where)


def _same_kind(loc: Any, like: Where) -> Any:
    """`loc` as the caller's kind of location: a Path for a local one, else its URI (or
    the Location itself when one was given)."""
    from data_prep.storage import Location, is_local

    if isinstance(like, Location):
        return loc
    return Path(loc.path) if is_local(loc.uri) else loc.uri


def is_complete(ckpt: Where) -> bool:
    """Whether the completion marker of `ckpt` is there and every file it lists is too,
    at the size it was written with (on any pyarrow filesystem)."""
    import pyarrow.fs as pafs

    try:
        loc = _loc(ckpt)
        files = json.loads(loc.join(COMPLETE_FILE).read_text())["files"]
        if not files:
            return False
        infos = loc.fs.get_file_info([loc.join(rel).path for rel in files])
        return all(i.type == pafs.FileType.File and i.size == size
                   for i, size in zip(infos, files.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def committed_by_ray(run_dir: Where) -> set[str]:
    """Names of the checkpoints Ray Train recorded as reported by every worker."""
    try:
        snapshot = json.loads(_loc(run_dir).join(RAY_SNAPSHOT).read_text())
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _checkpoint_dirs(run: Any) -> list[Any]:
    import pyarrow.fs as pafs

    try:
        infos = run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True))
    except OSError:
        return []
    return [run.join(i.base_name) for i in sorted(infos, key=lambda i: i.base_name)
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]


def trusted_checkpoints(run_dir: Where) -> list[Any]:
    """The checkpoint folders of a run that Ray committed or that are complete (Paths for
    a local run folder, URIs for a remote one)."""
    run = _loc(run_dir)
    committed = committed_by_ray(run)
    return [_same_kind(c, run_dir) for c in _checkpoint_dirs(run)
            if c.path.rsplit("/", 1)[-1] in committed or is_complete(c)]


def checkpoint_step(ckpt: Where) -> int:
    """The step of a checkpoint (its trainer_state.json, else the digits of its name)."""
    loc = _loc(ckpt)
    try:
        return int(json.loads(loc.join("trainer_state.json").read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        digits = re.findall(r"\d+", loc.path.rsplit("/", 1)[-1])
        return int(digits[-1]) if digits else -1


def latest_checkpoint(run_dir: Where) -> Any:
    """The trusted checkpoint with the highest step under a Ray Train run folder (a Path
    for a local run folder, a URI for a remote one), or None."""
    ckpts = [c for c in trusted_checkpoints(run_dir) if _loc(c).join("model").is_dir()]
    return max(ckpts, key=checkpoint_step) if ckpts else None


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
        model = task.load_model(Path(d) / "model")
    torch.set_rng_state(rank_state["torch_rng"])
    return Resume(model, trainer_state, epoch=int(rank_state["epoch"]),
                  skip=int(rank_state["batches_in_epoch"]),
                  attempt=trainer_state["attempt"] + 1)
