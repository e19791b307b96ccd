"""Checkpoints that do not stall training: when a worker checkpoints, and how its part of
a checkpoint reaches the run folder while training goes on.

    CheckpointSchedule    every N optimizer steps, every M minutes of rank 0's clock, and
                          at the end: the same decision on every rank
    snapshot_checkpoint   what a checkpoint holds at one step, copied to host memory
                          (HostCopy: on a thread, before the optimizer's next step)
    report_to_ray         hand a snapshot to Ray Train: written and uploaded on Ray's
                          upload thread (`--checkpoint-upload async`), or before `report`
                          returns (`sync`)

Async (the default): the training thread copies the small part of the state and starts
a `HostCopy` of the weights and optimizer moments into host memory (for BERT-base with
AdamW about 1.3 GB), which overlaps the next micro-batches (the next optimizer step waits
for it); Ray Train's upload thread (`CheckpointUploadMode.ASYNC` with our
`checkpoint_upload_fn`) writes the files into a local folder of its own, uploads them to
the run folder and deletes the folder. `ray.train.report` still meets the other ranks
(Ray agrees on the folder name), but nobody waits for storage. At most one checkpoint
per worker is in flight: a checkpoint due while the previous one is still uploading
waits for it (memory stays bounded; an interval shorter than an upload cannot be kept
anyway). The last checkpoint is committed before the worker ends: Ray waits for its
upload thread when the training function returns.

Trust is unchanged (workflows.run_folder): a checkpoint still uploading is not in Ray's
snapshot, and its completion marker (written last, but uploaded in no particular order)
does not match until every file is there, so a resume (Ray's latest committed checkpoint)
or `latest_checkpoint` never picks it.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workflows.config import LoopSettings
from workflows.training.checkpoint import rank_state_now, save_checkpoint

CHECKPOINT_PREFIX = "bertflow-ckpt-"  # the local folders a checkpoint is written into


class CheckpointSchedule:
    """Whether a worker checkpoints after an optimizer step: every `checkpoint_every`
    steps, when `checkpoint_every_minutes` have passed since the last checkpoint, and at
    the last step.

    The clock is rank 0's, read only at log steps (`log_now`, the same steps on every
    rank) and broadcast to the others there, so every rank takes the same decision
    without a host sync on the other steps; a time-based checkpoint therefore comes at the
    first log step after the interval has passed. The clock starts when the worker does
    (a resumed run counts from its restart)."""

    def __init__(self, loop: LoopSettings, device: torch.device,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = loop.checkpoint_every
        self.seconds = loop.checkpoint_every_minutes * 60.0
        self.device = device
        self.clock = clock
        self.last = clock()

    def due(self, step: int, *, final: bool, log_now: bool) -> bool:
        due = final or bool(self.every and step % self.every == 0)
        if not due and self.seconds and log_now:
            due = _rank0_decides(self.clock() - self.last >= self.seconds, self.device)
        if due:
            self.last = self.clock()
        return due


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (itself outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ---------------------------------------------------------------- the snapshot


class _FrozenTrainerState:
    """A StepRunner's step and state_dict as they were (what save_checkpoint reads)."""

    def __init__(self, step: int, state: dict[str, Any]) -> None:
        self.step, self._state = step, state

    def state_dict(self) -> dict[str, Any]:
        return self._state


class HostCopy:
    """Tensors copied into host memory on a thread of their own while training goes on.

    Between two optimizer steps only the optimizer changes the parameters and its state
    (forward and backward read them and write gradients), so the copy may overlap the
    next micro-batches: a pre-step hook on the optimizer makes its next step wait until
    the copy is done. On a GPU the copies run on a side stream that starts after the
    work queued so far (the last optimizer step), so they overlap compute too."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 optimizer: torch.optim.Optimizer | None) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._pairs = pairs
        self._stream = None
        if any(src.is_cuda for _, src in pairs):
            self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
        self.hook = (optimizer.register_step_pre_hook(self._before_step)
                     if optimizer is not None else None)
        threading.Thread(target=self._copy, name="bertflow-checkpoint-copy",
                         daemon=True).start()

    def _copy(self) -> None:
        try:
            with (torch.cuda.stream(self._stream) if self._stream is not None
                  else contextlib.nullcontext()):
                for dst, src in self._pairs:
                    dst.copy_(src)
                if self._stream is not None:
                    self._stream.synchronize()
        except BaseException as exc:  # raised where it is waited for
            self.error = exc
        finally:
            self._pairs = []
            self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError("copying a checkpoint to host memory failed") from self.error

    def _before_step(self, *_: Any) -> None:
        if not self.done.is_set() or self.error is not None:
            self.wait()


@dataclass
class CheckpointSnapshot:
    """Everything this rank's part of a checkpoint holds, fixed at one step: `write` gives
    the same files whenever it runs (after waiting for `host_copy`, when there is one).
    Rank 0 holds the model and the trainer state."""

    task: Any
    model: nn.Module | None
    trainer: Any  # a StepRunner (sync) or its _FrozenTrainerState (async)
    rank: int
    epoch: int
    batches_in_epoch: int
    attempt: int
    data: dict[str, Any] | None
    rank_state: dict[str, Any]
    host_copy: HostCopy | None = None

    def write(self, dest: Path) -> None:
        if self.host_copy is not None:
            self.host_copy.wait()
        save_checkpoint(dest, task=self.task, raw_model=self.model, runner=self.trainer,
                        rank=self.rank, epoch=self.epoch,
                        batches_in_epoch=self.batches_in_epoch, attempt=self.attempt,
                        data=self.data, rank_state=self.rank_state)


# Hooks of earlier host copies, removed from the training thread once their copy is done
# (the optimizer iterates its hooks while it steps: a hook cannot remove itself).
_copy_hooks: list[HostCopy] = []


def snapshot_checkpoint(*, task: Any, raw_model: nn.Module, runner: Any, rank: int,
                        epoch: int, batches_in_epoch: int, attempt: int,
                        data: dict[str, Any] | None = None,
                        copy_state: bool = True) -> CheckpointSnapshot:
    """This rank's checkpoint as of now. With `copy_state` the model's parameters and the
    optimizer's state are copied to host memory on a thread (`HostCopy`: the optimizer's
    next step waits for it) and the rest (buffers, schedule, scaler, step, RNG) here, so
    training goes on while it is written; without it the snapshot refers to the live
    objects (write it before the next step)."""
    for old in [c for c in _copy_hooks if c.done.is_set()]:
        old.hook.remove()
        _copy_hooks.remove(old)
    rank0 = rank == 0
    model = trainer = host_copy = None
    if rank0 and not copy_state:
        model, trainer = raw_model, runner
    elif rank0:
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        model = cpu_copy_of_module(raw_model, pairs)
        trainer = _FrozenTrainerState(runner.step, cpu_copy(runner.state_dict(), pairs))
        host_copy = HostCopy(pairs, getattr(runner, "optimizer", None))
        if host_copy.hook is not None:
            _copy_hooks.append(host_copy)
    return CheckpointSnapshot(task=task if rank0 else None, model=model, trainer=trainer,
                              rank=rank, epoch=epoch, batches_in_epoch=batches_in_epoch,
                              attempt=attempt, data=data,
                              rank_state=rank_state_now(epoch, batches_in_epoch),
                              host_copy=host_copy)


def _host_tensor(t: torch.Tensor, pairs: list | None) -> torch.Tensor:
    """A host copy of `t`: made now, or (with `pairs`) allocated now and filled by a
    HostCopy of `pairs`."""
    t = t.detach()
    if pairs is None:
        return t.to("cpu", copy=True)
    dst = torch.empty_like(t, device="cpu")
    pairs.append((dst, t))
    return dst


def cpu_copy(obj: Any, pairs: list | None = None) -> Any:
    """`obj` with every tensor in it (nested in dicts, lists, tuples) copied to host
    memory (`_host_tensor`); other values as they are (an optimizer's state_dict refers
    to its live moments: this is what makes it a snapshot)."""
    if isinstance(obj, torch.Tensor):
        return _host_tensor(obj, pairs)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v, pairs)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, pairs) for v in obj)
    return obj


def cpu_copy_of_module(model: nn.Module, pairs: list | None = None) -> nn.Module:
    """A copy of `model` on the CPU, parameters copied once each (tied weights stay
    tied; with `pairs`, filled later by a HostCopy), buffers copied now (a forward may
    change them), without first copying anything on the model's device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(_host_tensor(p, pairs), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------- handing it to Ray


class _Upload:
    """Ray's `checkpoint_upload_fn` for one snapshot: on Ray's upload thread, write the
    snapshot into `folder`, upload it with `persist` (Ray's own upload), then delete the
    folder. Idempotent, so Ray's retry of a failed upload sends the files again."""

    def __init__(self, snapshot: CheckpointSnapshot, folder: str,
                 persist: Callable[[Any, str], Any]) -> None:
        self.snapshot: CheckpointSnapshot | None = snapshot
        self.folder = folder
        self.persist = persist
        self.done = threading.Event()

    def __call__(self, checkpoint: Any, checkpoint_dir_name: str) -> Any:
        try:
            if self.snapshot is not None:
                self.snapshot.write(Path(self.folder))
                self.snapshot = None  # the host copy of the state is freed here
            persisted = self.persist(checkpoint, checkpoint_dir_name)
        except BaseException:
            self.done.set()  # the next checkpoint must not wait on a failed one
            raise
        shutil.rmtree(self.folder, ignore_errors=True)
        self.done.set()
        return persisted


# The upload of this process's latest async checkpoint. A weak reference: Ray's upload
# queue holds the upload until it ran, so a report Ray skipped (a worker group being torn
# down) leaves nothing to wait for.
_last_upload: Callable[[], _Upload | None] = lambda: None  # noqa: E731


def report_to_ray(snapshot: CheckpointSnapshot, metrics: dict[str, Any], name: str,
                  mode: str) -> None:
    """Report `metrics` with this rank's part of checkpoint `name` (`mode` "async" or
    "sync", see the module doc). Every rank must call it at the same steps."""
    global _last_upload
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from workflows.ray_internals import checkpoint_persister

    if mode == "sync":
        with tempfile.TemporaryDirectory(prefix=CHECKPOINT_PREFIX) as tmp:
            snapshot.write(Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        return
    previous = _last_upload()
    if previous is not None:
        previous.done.wait()  # at most one snapshot of this worker in memory
    folder = tempfile.mkdtemp(prefix=CHECKPOINT_PREFIX)
    upload = _Upload(snapshot, folder, checkpoint_persister())
    _last_upload = weakref.ref(upload)
    # The folder is ours (Ray deletes nothing: it is empty when report returns, and
    # `upload` removes it once the files are in the run folder).
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                     checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=False,
                     checkpoint_upload_fn=upload)
