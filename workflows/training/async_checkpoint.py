"""Checkpoints that do not stall training: when a worker checkpoints, and how its part of
a checkpoint reaches the run folder while training goes on.

    CheckpointSchedule    every N optimizer steps, every M minutes of rank 0's clock, and
                          at the end: the same decision on every rank
    snapshot_checkpoint   what a checkpoint holds at one step, copied to host memory
                          (HostCopy: on a thread, before the optimizer's next step)
                          that a writer process shares (SharedArena)
    report_to_ray         hand a snapshot to Ray Train: written by the writer process and
                          uploaded on Ray's upload thread (`--checkpoint-upload async`),
                          or written here before `report` returns (`sync`)

Async (the default): the training thread copies the small part of the state and starts
a `HostCopy` of the weights and optimizer moments into the SharedArena (for BERT-base
with AdamW about 1.3 GB), which overlaps the next micro-batches (the next optimizer step
waits for it). Ray Train's upload thread (`CheckpointUploadMode.ASYNC` with our
`checkpoint_upload_fn`) has the arena's writer process, a process of this worker's own
that maps the same memory, write the files into a local folder (serialising with
safetensors and torch.save takes seconds of CPU, and safetensors holds the GIL: in this
process it slowed the training thread's Python), uploads them to the run folder and
deletes the folder. `ray.train.report` still meets the other ranks (Ray agrees on the
folder name), but nobody waits for storage. At most one checkpoint per worker is in
flight: a checkpoint due while the previous one is still being written or uploaded
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
import io
import json
import math
import mmap
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workflows.config import LoopSettings
from workflows.training.checkpoint import rank_state_now, save_checkpoint
from workflows.transfer import ShippedFolder, local_folder

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
    work queued so far (the last optimizer step), so they overlap compute too. `first`
    runs on the thread before the copies (reserving the shared memory they go to)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 optimizer: torch.optim.Optimizer | None,
                 first: Callable[[], None] | None = None) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._pairs = pairs
        self._first = first
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
            if self._first is not None:
                self._first()
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
            raise RuntimeError(f"copying a checkpoint to host memory failed: "
                               f"{self.error}") from self.error

    def _before_step(self, *_: Any) -> None:
        if not self.done.is_set() or self.error is not None:
            self.wait()


@dataclass
class CheckpointSnapshot:
    """Everything this rank's part of a checkpoint holds, fixed at one step: `write` gives
    the same files whenever it runs (after waiting for `host_copy`, when there is one).
    Rank 0 holds the model and the trainer state; in an async snapshot their tensors
    live in `arena`, and the arena's writer process writes the files."""

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
    arena: SharedArena | None = None

    def write(self, dest: Path) -> None:
        if self.host_copy is not None:
            self.host_copy.wait()
        job = dict(task=self.task, raw_model=self.model, runner=self.trainer, rank=self.rank,
                   epoch=self.epoch, batches_in_epoch=self.batches_in_epoch,
                   attempt=self.attempt, data=self.data, rank_state=self.rank_state)
        if self.arena is None:
            save_checkpoint(dest, **job)
        else:
            self.arena.write(self, dest, job)


# Hooks of earlier host copies, removed from the training thread once their copy is done
# (the optimizer iterates its hooks while it steps: a hook cannot remove itself).
_copy_hooks: list[HostCopy] = []


def snapshot_checkpoint(*, task: Any, raw_model: nn.Module, runner: Any, rank: int,
                        epoch: int, batches_in_epoch: int, attempt: int,
                        data: dict[str, Any] | None = None,
                        copy_state: bool = True) -> CheckpointSnapshot:
    """This rank's checkpoint as of now. With `copy_state` the model's parameters and the
    optimizer's state are copied on a thread (`HostCopy`: the optimizer's next step waits
    for it) into this process's `SharedArena`, whose writer process will write them, and
    the rest (buffers, schedule, scaler, step, RNG) here, so training goes on while it is
    written; without it the snapshot refers to the live objects (write it before the
    next step)."""
    for old in [c for c in _copy_hooks if c.done.is_set()]:
        old.hook.remove()
        _copy_hooks.remove(old)
    rank0 = rank == 0
    model = trainer = host_copy = arena = None
    if rank0 and not copy_state:
        model, trainer = raw_model, runner
    elif rank0:
        state = runner.state_dict()
        params = list(raw_model.parameters())
        arena = SharedArena.with_room(sum(_aligned(_nbytes(t)) for t in
                                          params + list(_tensors_in(state))))
        place = arena.take()  # waits while the previous snapshot is being written
        model = cpu_copy_of_module(raw_model, place)
        trainer = _FrozenTrainerState(runner.step, cpu_copy(state, place))
        host_copy = HostCopy(place.pairs, getattr(runner, "optimizer", None),
                             first=arena.reserve)
        if host_copy.hook is not None:
            _copy_hooks.append(host_copy)
    snapshot = CheckpointSnapshot(task=task if rank0 else None, model=model, trainer=trainer,
                                  rank=rank, epoch=epoch, batches_in_epoch=batches_in_epoch,
                                  attempt=attempt, data=data,
                                  rank_state=rank_state_now(epoch, batches_in_epoch),
                                  host_copy=host_copy, arena=arena)
    if arena is not None:
        arena.hold(snapshot)
    return snapshot


def _host_tensor(t: torch.Tensor, place: _Placement | None) -> torch.Tensor:
    """A host copy of `t`: made now, or (with `place`) a tensor in the arena that a
    HostCopy of `place.pairs` fills."""
    t = t.detach()
    if place is None:
        return t.to("cpu", copy=True)
    return place.host_tensor(t)


def cpu_copy(obj: Any, place: _Placement | None = None) -> Any:
    """`obj` with every tensor in it (nested in dicts, lists, tuples) copied to host
    memory (`_host_tensor`); other values as they are (an optimizer's state_dict refers
    to its live moments: this is what makes it a snapshot)."""
    if isinstance(obj, torch.Tensor):
        return _host_tensor(obj, place)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v, place)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, place) for v in obj)
    return obj


def _tensors_in(obj: Any):
    """The tensors `cpu_copy(obj)` copies, in its order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def cpu_copy_of_module(model: nn.Module, place: _Placement | None = None) -> nn.Module:
    """A copy of `model` on the CPU, parameters copied once each (tied weights stay
    tied; with `place`, into the arena, filled later by a HostCopy), buffers copied now
    (a forward may change them), without first copying anything on the model's device.
    The copy is for writing only: a compiled forward (`--compile`) is not carried over."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(_host_tensor(p, place), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    copied = copy.deepcopy(model, memo)
    for m in copied.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return copied


# ---------------------------------------------------------------- the writer process

_ALIGN = 64  # bytes: every tensor in the arena starts at a multiple (any dtype's alignment)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Placement:
    """Where one snapshot's large tensors go: tensors of the arena handed out in turn,
    and the (arena tensor, live tensor) pairs a HostCopy fills them from."""

    def __init__(self, arena: SharedArena) -> None:
        self.arena, self.used = arena, 0
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def host_tensor(self, t: torch.Tensor) -> torch.Tensor:
        dst = self.arena.tensor(self.used, t.dtype, t.shape)
        self.used += _aligned(_nbytes(t))
        self.pairs.append((dst, t))
        return dst


def _arena_tensor(buffer: Any, offset: int, dtype: torch.dtype,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor at `offset` of a shared buffer, with a storage of its own (safetensors
    and torch.save treat tensors of one storage as views of each other)."""
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=n, offset=offset).view(shape)


class SharedArena:
    """Host memory this process shares with a writer process of its own, which writes
    (serialises) the async snapshots held in it.

    Writing a BERT-base checkpoint is seconds of CPU, and safetensors holds Python's GIL
    while it serialises: on a thread of the training process that slowed the training
    thread's Python (the kernel launches of the next steps). The snapshot is copied into
    this memory (an unlinked file in /dev/shm, mapped by both processes: nothing to clean
    up, whatever ends them); the writer maps the same pages, so the tensors reach it
    without another copy, and only the snapshot's structure is pickled to it. One arena
    per process, kept for the run (one more copy of the state in host memory), and one
    snapshot in it at a time: a checkpoint due while the previous one is still being
    written waits for it."""

    _current: SharedArena | None = None
    _lock = threading.Lock()

    @classmethod
    def with_room(cls, nbytes: int) -> SharedArena:
        """This process's arena, replaced by a larger one if it cannot hold `nbytes`."""
        with cls._lock:
            old = cls._current
            if old is None or old.nbytes < nbytes:
                if old is not None:
                    old.take().arena.close()  # after its last snapshot was written
                cls._current = cls(nbytes)
                with cls._current._writer_lock:  # it starts (imports torch) meanwhile
                    cls._current._running_writer()
            return cls._current

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        shm = "/dev/shm"
        roomy = os.path.isdir(shm) and (os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
                                        > 1.1 * nbytes)
        self.folder = shm if roomy else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="bertflow-checkpoint-arena-", dir=self.folder)
        os.unlink(path)
        self.fd = fd  # open for the life of the process: the writer maps it
        os.ftruncate(fd, max(nbytes, 1))
        self.buffer = mmap.mmap(fd, max(nbytes, 1))
        self._reserved = False
        self._free = threading.Event()
        self._free.set()
        self._owner: Callable[[], Any] = lambda: None  # noqa: E731
        self._generation = 0
        self._base = self.tensor(0, torch.uint8, (1,)).data_ptr()
        self._state_lock = threading.Lock()
        self._writer: subprocess.Popen | None = None
        self._writer_lock = threading.Lock()

    def reserve(self) -> None:
        """Allocate the arena's pages (once): no room fails here, clearly, not as a bus
        error in the middle of a copy."""
        if self._reserved:
            return
        try:
            os.posix_fallocate(self.fd, 0, max(self.nbytes, 1))
        except OSError as exc:
            raise OSError(f"no room for a checkpoint's host copy ({self.nbytes / 1e9:.2f} GB) "
                          f"in {self.folder}: free memory (or space) there, or use "
                          f"--checkpoint-upload sync") from exc
        self._reserved = True

    def tensor(self, offset: int, dtype: torch.dtype, shape: Any) -> torch.Tensor:
        return _arena_tensor(self.buffer, offset, dtype, tuple(shape))

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where `t` lies in the arena (None: elsewhere)."""
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        offset = t.data_ptr() - self._base
        return offset if 0 <= offset < self.nbytes else None

    def take(self) -> _Placement:
        """The arena for a new snapshot, once the previous one was written (or dropped)."""
        while True:
            self._free.wait()
            with self._state_lock:
                if self._free.is_set():
                    self._free.clear()
                    self._generation += 1
                    self._owner = lambda: None  # noqa: E731
                    return _Placement(self)

    def hold(self, snapshot: CheckpointSnapshot) -> None:
        """`snapshot`'s tensors are in the arena now (free again once it is written, or
        dropped unwritten: a report Ray skipped)."""
        self._owner = weakref.ref(snapshot)
        weakref.finalize(snapshot, self._release, self._generation)

    def _release(self, generation: int) -> None:
        with self._state_lock:
            if generation == self._generation:
                self._free.set()

    def write(self, snapshot: CheckpointSnapshot, dest: Path, job: dict[str, Any]) -> None:
        """Write `snapshot` (its `save_checkpoint` arguments `job`) into `dest` in the
        writer process; raises with the writer's error or exit."""
        with self._state_lock:
            if self._owner() is not snapshot:
                raise RuntimeError(f"checkpoint for {dest}: its host copy was reused by a "
                                   f"later checkpoint (it was not written in time)")
            self._free.clear()  # a retry after a failure holds the arena again
        try:
            request = {"dest": str(dest), **job}
            with self._writer_lock:
                writer = self._running_writer()
                _send(writer.stdin, _dumps_with_arena(request, self))
                reply = _receive(writer.stdout)
            if reply is None:
                raise RuntimeError(f"the checkpoint writer process (pid {writer.pid}) ended "
                                   f"(exit code {writer.wait()}) while writing {dest}; its "
                                   f"output is in this worker's log (out of memory?)")
            error = json.loads(reply)["error"]
            if error:
                raise RuntimeError(f"writing checkpoint {dest} failed in the writer "
                                   f"process:\n{error}")
        finally:
            self._free.set()

    def _running_writer(self) -> subprocess.Popen:
        """The writer process, started (again) if it is not running."""
        if self._writer is None or self._writer.poll() is not None:
            code = "from workflows.training.async_checkpoint import writer_main; writer_main()"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._writer = subprocess.Popen(
                [sys.executable, "-c", code, str(self.fd)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, pass_fds=(self.fd,), env=env)
        return self._writer

    def close(self) -> None:
        """End the writer (it exits when its input closes) and forget the memory."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                writer.wait(timeout=30)
        os.close(self.fd)


def _send(stream: Any, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "little"))
    stream.write(data)
    stream.flush()


def _receive(stream: Any) -> bytes | None:
    """One message (None when the other side is gone)."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    data = stream.read(int.from_bytes(head, "little"))
    return data if len(data) == int.from_bytes(head, "little") else None


def _dumps_with_arena(obj: Any, arena: SharedArena) -> bytes:
    """`obj` pickled with its arena tensors as references (offset, dtype, shape): the
    writer rebuilds them over the same memory. Ray's cloudpickle in a Ray worker, for
    the classes a driver sent by value (tests' tasks)."""
    if "ray" in sys.modules:
        from ray import cloudpickle as pickler
    else:
        pickler = pickle

    object_ref = sys.modules["ray"].ObjectRef if "ray" in sys.modules else None

    class ArenaPickler(pickler.Pickler):
        def reducer_override(self, value: Any) -> Any:
            # The writer has no Ray: a folder shipped through Ray's object store (a task's
            # tokenizer, on a cluster) goes as this node's copy of it, and what else lives
            # in the object store (a fine-tuning task's train rows) stays behind: saving a
            # model reads neither.
            if isinstance(value, ShippedFolder):
                return str, (str(local_folder(value)),)
            if object_ref is not None and isinstance(value, object_ref):
                return _left_behind, ()
            parent = getattr(super(), "reducer_override", None)
            return NotImplemented if parent is None else parent(value)

        def persistent_id(self, t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return None
            offset = arena.offset_of(t)
            if offset is None:
                return None
            key = ids.setdefault(id(t), len(ids))  # the same object (a tied weight) once
            return ("arena", key, offset, t.dtype, tuple(t.shape),
                    isinstance(t, nn.Parameter), t.requires_grad)

    ids: dict[int, int] = {}
    out = io.BytesIO()
    ArenaPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()


def _left_behind() -> None:
    """What the writer gets for a Ray object reference (see `_dumps_with_arena`)."""
    return None


class _ArenaUnpickler(pickle.Unpickler):
    """Reads what `_dumps_with_arena` wrote, in the writer (its parent's own objects)."""

    def __init__(self, data: bytes, buffer: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.buffer = buffer
        self.made: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> torch.Tensor:
        _, key, offset, dtype, shape, is_param, requires_grad = pid
        if key not in self.made:
            t = _arena_tensor(self.buffer, offset, dtype, shape)
            self.made[key] = nn.Parameter(t, requires_grad=requires_grad) if is_param else t
        return self.made[key]


def writer_main() -> None:
    """The writer process: `python -c ... FD`, FD the arena. Reads requests on stdin,
    writes each checkpoint with `save_checkpoint` and answers {"error": None | traceback}
    on what was stdout (prints of libraries go to stderr); ends when stdin closes."""
    fd = int(sys.argv[1])
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    torch.set_num_threads(1)
    buffer = mmap.mmap(fd, 0)
    while (message := _receive(requests)) is not None:
        error = None
        try:
            job = _ArenaUnpickler(message, buffer).load()
            save_checkpoint(Path(job.pop("dest")), **job)
            del job
        except BaseException:  # the parent raises it, with this text
            error = traceback.format_exc()
        _send(replies, json.dumps({"error": error}).encode())


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
