"""Checkpoints that do not stall training (workflows/training/async_checkpoint.py): when a
worker checkpoints (steps, wall clock), that a snapshot taken between two steps is the
checkpoint of that step however long training goes on before it is written, and, on a
real Ray Train run with async upload, that only committed checkpoints are trusted and a
failed run resumes from one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import RegressionTask, batch_of, make_rows
from workflows.config import LoopSettings
from workflows.run_folder import (COMPLETE_FILE, RAY_SNAPSHOT, checkpoint_step, committed_by_ray,
                                  is_complete, latest_checkpoint, trusted_checkpoints)
from workflows.training.async_checkpoint import (CheckpointSchedule, _Upload, cpu_copy_of_module,
                                                 snapshot_checkpoint)
from workflows.training.checkpoint import load_checkpoint_state, write_completion_marker
from workflows.training.step import StepRunner

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_schedule_checkpoints_every_n_steps_every_m_minutes_at_log_steps_and_at_the_end():
    clock = FakeClock()
    loop = LoopSettings(checkpoint_every=10, checkpoint_every_minutes=0.5, log_every=3)
    schedule = CheckpointSchedule(loop, CPU, clock=clock)
    due = []
    for step in range(1, 31):
        clock.now += 4.0  # 4 s a step: 30 s pass by step 8
        if schedule.due(step, final=step == 30, log_now=step % 3 == 0):
            due.append(step)
    # 10 and 20 by steps, 30 the end; by the clock 9 (the first log step 30 s after the
    # start: 36 s) and 18 (32 s after the checkpoint of step 10), not 27 (28 s after 20).
    assert due == [9, 10, 18, 20, 30]

    # Without the time interval the wall clock is never read.
    steps_only = CheckpointSchedule(LoopSettings(checkpoint_every=4), CPU, clock=clock)
    assert [s for s in range(1, 10) if steps_only.due(s, final=False, log_now=True)] == [4, 8]
    with pytest.raises(Exception, match="checkpoint_every_minutes"):
        LoopSettings(checkpoint_every_minutes=-1)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_a_snapshot_is_the_checkpoint_of_its_step_written_after_training_went_on(
        tmp_path, optimizer):
    """The copy to host memory runs on a thread; the optimizer's next step waits for it."""
    task, rows = RegressionTask(), make_rows(32, seed=2)
    loop = LoopSettings(warmup_steps=0, max_steps=20, lr=0.05, optimizer=optimizer)
    torch.manual_seed(0)
    model = task.build_model()
    runner = StepRunner(model, loop, CPU)

    def train(steps: int) -> None:
        for s in range(steps):
            runner.forward_backward(task, batch_of(rows[(s % 4) * 8:(s % 4) * 8 + 8]))
            runner.optimizer_step()

    train(3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [runner.optimizer.state[p]["exp_avg"].clone()  # in the state_dict's order
               for group in runner.optimizer.param_groups for p in group["params"]]
    rng = torch.get_rng_state()
    snap = snapshot_checkpoint(task=task, raw_model=model, runner=runner, rank=0, epoch=1,
                               batches_in_epoch=3, attempt=0, data={"seed": 42})
    assert snap.host_copy is not None
    train(4)  # the live model, optimizer and RNG move on before the snapshot is written
    torch.rand(100)
    assert snap.host_copy.done.is_set()  # the first of those steps waited for the copy
    snap.write(tmp_path)

    trainer_state, rank_state = load_checkpoint_state(tmp_path, rank=0)
    assert trainer_state["step"] == 3 and runner.step == 7
    assert torch.equal(rank_state["torch_rng"], rng)
    saved = task.load_model(tmp_path / "model").state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
    assert not all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    state = trainer_state["optimizer"]["state"]
    saved_moments = [state[i]["exp_avg"] for i in sorted(state)]
    assert len(saved_moments) == len(moments)
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, moments))
    assert is_complete(tmp_path)
    assert json.loads((tmp_path / "trainer_state.json").read_text())["data"] == {"seed": 42}


def test_the_copy_of_a_bert_keeps_its_tied_decoder_and_saves_like_the_original(tmp_path):
    from bert_core import BertConfig
    from bert_core.heads import BertForPreTraining

    model = BertForPreTraining(BertConfig.preset("tiny"))
    copied = cpu_copy_of_module(model)
    names = dict(copied.named_parameters(remove_duplicate=False))
    shared = [n for n, p in names.items() if p is copied.bert.embeddings.word_embeddings.weight]
    original = [n for n, p in model.named_parameters(remove_duplicate=False)
                if p is model.bert.embeddings.word_embeddings.weight]
    assert shared == original
    assert all(p is not q for p, q in zip(copied.parameters(), model.parameters()))
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(1.0)  # training goes on
    copied.save_pretrained(tmp_path)
    reloaded = BertForPreTraining.from_pretrained(tmp_path, strict=True)
    assert torch.equal(reloaded.bert.embeddings.word_embeddings.weight, before)


def test_an_upload_writes_then_removes_its_folder_and_a_retry_sends_the_files_again(tmp_path):
    task = RegressionTask()
    model = task.build_model()
    runner = StepRunner(model, LoopSettings(max_steps=10, warmup_steps=0), CPU)
    snap = snapshot_checkpoint(task=task, raw_model=model, runner=runner, rank=0, epoch=0,
                               batches_in_epoch=0, attempt=0)
    local = tmp_path / "local"
    local.mkdir()
    sent: list[Path] = []

    def persist(checkpoint, name):  # what Ray's upload does: copy into the run folder
        if not sent:
            sent.append(Path("failed"))
            raise OSError("connection reset")  # Ray retries an upload that failed
        shutil.copytree(checkpoint, tmp_path / "run" / name)
        sent.append(tmp_path / "run" / name)
        return sent[-1]

    upload = _Upload(snap, str(local), persist)
    with pytest.raises(OSError):
        upload(str(local), "checkpoint_00000000")
    assert upload.done.is_set() and local.is_dir()  # nothing waits on it, files kept
    assert upload(str(local), "checkpoint_00000000") == tmp_path / "run" / "checkpoint_00000000"
    assert not local.exists() and upload.snapshot is None
    assert is_complete(sent[-1])


def test_the_writer_process_reports_its_errors_is_replaced_when_it_dies_and_frees_its_memory(
        tmp_path):
    """The files are written by a process of the worker's own (serialising holds Python's
    GIL: not in the training process); its memory holds one snapshot at a time."""
    import gc
    import os

    task = RegressionTask()
    model = task.build_model()
    runner = StepRunner(model, LoopSettings(max_steps=10, warmup_steps=0), CPU)

    def snap():
        return snapshot_checkpoint(task=task, raw_model=model, runner=runner, rank=0,
                                   epoch=0, batches_in_epoch=runner.step, attempt=0)

    first = snap()
    writer = first.arena._running_writer()
    assert writer.pid != os.getpid()
    taken = tmp_path / "a file"
    taken.write_text("in the way")
    with pytest.raises(RuntimeError, match="failed in the writer process(.|\n)*FileExistsError"):
        first.write(taken)  # the writer's own error, with its traceback
    writer.kill()
    writer.wait()
    first.write(tmp_path / "retried")  # Ray's retry: a new writer, the same snapshot
    assert is_complete(tmp_path / "retried") and first.arena._writer.pid != writer.pid

    runner.step = 1
    second = snap()  # the arena is free once `first` is written: `second` holds it now
    assert second.arena is first.arena
    with pytest.raises(RuntimeError, match="reused by a later checkpoint"):
        first.write(tmp_path / "stale")
    del second  # a report Ray skipped: never written, its memory is free again
    gc.collect()
    runner.step = 2
    third = snap()
    third.write(tmp_path / "third")
    assert load_checkpoint_state(tmp_path / "third", rank=0)[0]["step"] == 2


# ---------------------------------------------------------------- real Ray Train


class FailsOnceAfterCheckpoints(RegressionTask):
    """Sleeps in every micro-batch (the run lasts at least that long, whatever the
    machine), and raises once, on rank 0, after Ray committed `after` checkpoints."""

    def __init__(self, run_dir: str, marker: str, after: int) -> None:
        super().__init__(sleep_s=0.03)
        self.run_dir, self.marker, self.after = run_dir, marker, after

    def compute_loss(self, model, batch):
        import os

        import ray.train

        if ray.train.get_context().get_world_rank() == 0 and not os.path.exists(self.marker) \
                and len(committed_by_ray(self.run_dir)) >= self.after:
            Path(self.marker).write_text("failed once")
            raise RuntimeError("injected failure")
        return super().compute_loss(model, batch)


@pytest.mark.ray
@pytest.mark.slow
def test_async_checkpoints_by_time_are_trusted_once_committed_and_a_failure_resumes_from_one(
        ray_local, tmp_path):
    from workflows.training.engine import run_folder, run_training

    import sys

    import tests.test_engine

    for module in (tests.test_engine, sys.modules[__name__]):  # workers cannot import tests/
        ray_local.cloudpickle.register_pickle_by_value(module)
    loop = LoopSettings(num_workers=2, cpus_per_worker=0.5, batch_size=8, lr=0.05,
                        warmup_steps=0, max_steps=80, checkpoint_every=0,
                        checkpoint_every_minutes=0.01, log_every=5, eval_every=0,
                        keep_checkpoints=100, max_failures=1, storage_path=str(tmp_path / "runs"))
    assert loop.checkpoint_upload == "async"  # the default
    run = run_folder(loop, "async")
    task = FailsOnceAfterCheckpoints(run.uri, str(tmp_path / "failed"), after=2)
    result = run_training(task, loop, run=run,
                          datasets={"train": ray_local.data.from_items(make_rows(256, seed=3))})

    # The failure came after two committed checkpoints; the new worker group started from
    # a committed one (not from scratch) and trained to the end.
    assert (tmp_path / "failed").exists()
    assert result.step == 80 and result.attempt == 1
    committed = sorted(committed_by_ray(run.uri))
    steps = [int(name.rsplit("_", 1)[1]) for name in committed]
    assert result.start_step in steps and result.start_step > 0
    # Checkpoints came by the clock (every 0.6 s at a log step): with checkpoint_every=0
    # the steps alone would have given only the last one.
    assert len([s for s in steps if s < 80]) >= 2 and all(s % 5 == 0 for s in steps)
    # Every committed checkpoint is complete. The folders Ray never recorded are the lost
    # attempt's: uploaded (or cut short) after the checkpoint the run resumed from, at
    # steps the new attempt's clock did not checkpoint again.
    folders = sorted(p.name for p in Path(run.uri).glob("checkpoint_*"))
    assert set(committed) <= set(folders), (committed, folders)
    assert all(is_complete(Path(run.uri) / name) for name in committed)
    for name in set(folders) - set(committed):
        if not (Path(run.uri) / name / "trainer_state.json").is_file():  # cut short
            assert not is_complete(Path(run.uri) / name)
            continue
        state = json.loads((Path(run.uri) / name / "trainer_state.json").read_text())
        assert state["attempt"] == 0 and state["step"] > result.start_step, (name, state)
    assert latest_checkpoint(run.uri) == Path(run.uri) / "checkpoint_00000080"

    # A checkpoint still uploading (its marker there, a file not yet) is not trusted,
    # even at a later step; once its files are all there it is.
    src = Path(run.uri) / "checkpoint_00000080"
    inflight = Path(run.uri) / "checkpoint_00000085"
    shutil.copytree(src, inflight)
    (inflight / "trainer_state.json").write_text(json.dumps({"step": 85}))
    write_completion_marker(inflight)
    weights = (inflight / "model" / "model.safetensors").read_bytes()
    (inflight / "model" / "model.safetensors").unlink()
    assert inflight not in trusted_checkpoints(run.uri)
    assert latest_checkpoint(run.uri) == src
    (inflight / "model" / "model.safetensors").write_bytes(weights)
    assert latest_checkpoint(run.uri) == inflight and checkpoint_step(inflight) == 85
    assert (Path(run.uri) / RAY_SNAPSHOT).is_file() and (src / COMPLETE_FILE).is_file()


@pytest.mark.ray
def test_the_writer_gets_a_shipped_folder_as_its_local_copy_and_no_ray_reference(
        ray_local, tmp_path):
    """The writer process has no Ray: on a cluster a task's tokenizer is a folder shipped
    through the object store and a fine-tuning task holds its rows there. What the writer
    gets is this node's copy of the folder and no object reference (unpickling one needs
    Ray: the cluster run failed at its first checkpoint)."""
    from dataclasses import dataclass

    from workflows.training.async_checkpoint import (SharedArena, _ArenaUnpickler,
                                                     _dumps_with_arena)
    from workflows.transfer import ship_folder

    @dataclass
    class Job:
        tokenizer_dir: object
        rows: object
        weight: torch.Tensor

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    arena = SharedArena(64)
    weight = arena.tensor(0, torch.float32, (4,))
    weight.copy_(torch.arange(4.0))
    job = Job(ship_folder(tmp_path / "tok"), ray_local.put([1, 2, 3]), weight)
    got = _ArenaUnpickler(_dumps_with_arena({"job": job}, arena), arena.buffer).load()["job"]
    assert isinstance(got.tokenizer_dir, str) and got.rows is None
    assert (Path(got.tokenizer_dir) / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert torch.equal(got.weight, torch.arange(4.0))  # the arena's tensors as before
