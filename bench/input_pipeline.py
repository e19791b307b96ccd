"""Can the training input pipeline keep a GPU fed? Tokens per CPU core, no model step.

Batches go from Parquet parts to `collate_pretraining` (padding, labels, and for dynamic
masking the masks) to torch tensors. Three ways of driving it:

- `rank reader`: what pretraining's loop runs (`workflows/training/loop.py`
  `train_batches`): the worker reads its streams' parts itself (`training/rows.py`
  `RankReader`, reshuffled every epoch, read ahead on a thread, no Ray Data), then
  `data_prep.iter_collated` collates ahead on threads. This is the figure that counts;
- `iter_collated`: a Ray Data `streaming_split` shard (what fine-tuning's loop reads)
  with `iter_batches(batch_format="pyarrow")` + `iter_collated`;
- `ray collate_fn`: the reference, `iter_torch_batches(collate_fn=...)` on the same
  shard, one generator shared by Ray's collate threads (the first build's loop).

Rows are synthetic in the dataset schema (lengths as prep makes them: 90% full, 10%
short), so the figure does not depend on prep. CPU time is summed over the whole process
tree (driver + Ray workers reading Parquet) from /proc, from the iterator's start (Ray
Data's start-up included, so the rate is conservative); tokens per CPU-second is the
per-core rate, and 700k tokens/s (BERT-base, one H100, bf16, ~50% MFU) divided by it is
the cores one GPU needs (goal: <= 4).

With `--world 1 8 64` it measures how the reader scales instead: rank 0 of W simulated
ranks (every rank does the same work on its own share) reads one epoch of a split of
`--parts` parts through the real reader, training on each micro-batch for the time a GPU
would (`--gpu-tokens-per-s`, a sleep that uses no CPU). Printed per W: bytes rank 0 read
in the epoch (goal: split / W), its tokens per CPU-second, parts and footers included
(goal at 64: within 10% of 1 worker), and the seconds it was blocked in `next()` waiting
for a part (goal: ~0, the next part is read ahead).

    python bench/input_pipeline.py [--tokens 1e7] [--seq 128 512]
    python bench/input_pipeline.py --world 1 8 64 [--parts 128] [--part-rows 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

GPU_TOKENS_PER_S = 700_000
MODES = ("ray collate_fn", "iter_collated", "rank reader")  # the reference first
VOCAB, PAD, CLS, SEP, MASK = 30522, 0, 101, 102, 103


def tree_cpu_seconds() -> float:
    """utime + stime of this process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])
    return total / os.sysconf("SC_CLK_TCK")


def write_dataset(folder: Path, seq: int, rows: int, static: bool, parts: int = 8) -> None:
    import pyarrow.parquet as pq

    from data_prep.masking import MaskingSpec
    from data_prep.recipe import Instance, instances_to_table

    rng = np.random.default_rng(seq)
    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP),
                       max_predictions=max(20, round(seq * 0.15)))
    folder.mkdir(parents=True)
    for p in range(parts):
        n = rows // parts
        lengths = np.where(rng.random(n) < 0.1, rng.integers(8, seq, n), seq)
        insts = []
        for length in lengths:
            ids = rng.integers(1000, VOCAB, length).astype(np.int32)
            cut = int(rng.integers(2, length - 1))
            ids[0], ids[cut], ids[-1] = CLS, SEP, SEP
            types = np.zeros(length, np.int8)
            types[cut + 1:] = 1
            insts.append(Instance(ids, types, int(rng.integers(0, 2))))
        if static:
            masked, pos, orig = spec.apply_batch([x.input_ids for x in insts], rng)
            for x, m, ps, o in zip(insts, masked, pos, orig):
                x.input_ids, x.positions, x.originals = m, ps.astype(np.int32), o.astype(np.int32)
        pq.write_table(instances_to_table(insts, "nsp", static), folder / f"part-{p:05d}.parquet")


def measure(folder: Path, seq: int, batch_size: int, static: bool, mode: str,
            max_tokens: float) -> tuple[float, float]:
    """(tokens per CPU-second, tokens per wall-second) of one pass over the shard."""
    import ray
    import torch

    from data_prep.collate import collate_pretraining, iter_collated
    from data_prep.masking import MaskingSpec

    masking = None if static else MaskingSpec(
        vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP),
        max_predictions=max(20, round(seq * 0.15)))

    def collate(batch, rng):  # what PretrainTask.collate does
        arrays = collate_pretraining(batch, PAD, masking, rng)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    if mode == "rank reader":
        from workflows.training.rows import BatchPlan, RankReader, list_parts

        plan = BatchPlan(tuple(list_parts(str(folder))), batch_size, streams=1, seed=0)
        reader = RankReader(plan, rank=0, world=1, epoch=0)
        raw = (table for _, _, table in reader.batches())
        try:
            return _drive(iter_collated(raw, collate, seed=0, epoch=0, rank=0), max_tokens)
        finally:
            reader.close()
    shard = ray.data.read_parquet(str(folder)).streaming_split(1, equal=True)[0]
    if mode == "ray collate_fn":
        rng = np.random.default_rng([0, 0, 0])
        batches = shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                           prefetch_batches=2,
                                           collate_fn=lambda b: collate(b, rng))
    else:
        raw = shard.iter_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2,
                                 batch_format="pyarrow")
        batches = iter_collated(raw, collate, seed=0, epoch=0, rank=0)
    return _drive(batches, max_tokens)


def _drive(batches, max_tokens: float) -> tuple[float, float]:
    # CPU is counted from the start (Parquet reads, Ray Data's start-up included: a
    # conservative per-core rate); wall time after 3 warm-up batches (steady state).
    cpu0 = tree_cpu_seconds()
    batches = iter(batches)
    tokens = 0
    for _ in range(3):
        tokens += int(next(batches)["attention_mask"].sum())
    t0, warm = time.perf_counter(), tokens
    for batch in batches:
        tokens += int(batch["attention_mask"].sum())
        if tokens >= max_tokens:
            break
    cpu, wall = tree_cpu_seconds() - cpu0, time.perf_counter() - t0
    return tokens / cpu, (tokens - warm) / wall


def scaling(worlds: list[int], parts: int, part_rows: int, seq: int, batch_size: int,
            gpu_tokens_per_s: float) -> None:
    """Rank 0 of each world size: bytes, tokens per CPU-second, time blocked (docstring)."""
    import torch

    from data_prep.collate import collate_pretraining, iter_collated
    from workflows.training.rows import BatchPlan, RankReader, ReadStats, list_parts

    work = Path(tempfile.mkdtemp(prefix="bertflow-input-scale-"))
    try:
        write_dataset(work / "train", seq, parts * part_rows, static=True, parts=parts)
        listed = list_parts(str(work / "train"))
        split = sum(p.size for p in listed)
        streams = max(worlds)  # one global batch: a micro-batch per rank at the largest W
        plan = BatchPlan(tuple(listed), batch_size, streams=streams, seed=0)
        print(f"reader scaling: split {split / 1e6:.1f} MB in {parts} parts, global batch "
              f"{streams} x {batch_size} rows, seq {seq}, a GPU step at "
              f"{gpu_tokens_per_s:,.0f} tokens/s (simulated)")

        def collate(item, rng):
            return torch.from_numpy(collate_pretraining(item, PAD, None, rng)["attention_mask"])

        rates = {}
        for world in worlds:
            stats = ReadStats()
            cpu0, tokens, first_step = time.process_time(), 0, None
            with RankReader(plan, rank=0, world=world, epoch=0, stats=stats) as reader:
                raw = (table for _, _, table in reader.batches())
                for i, mask in enumerate(iter_collated(raw, collate, seed=0, epoch=0)):
                    n = int(mask.sum())
                    tokens += n
                    time.sleep(n / gpu_tokens_per_s)  # the model step, on a GPU
                    if i == len(reader.mine) - 1:  # the first step waits for first reads
                        first_step = stats.blocked_s
            cpu = time.process_time() - cpu0
            rates[world] = tokens / cpu
            print(f"world {world:3d}: rank 0 read {stats.bytes / 1e6:8.2f} MB "
                  f"({stats.bytes / split:6.3f} of the split, goal {1 / world:.3f}), "
                  f"{rates[world]:12,.0f} tokens/CPU-s, blocked in next() "
                  f"{stats.blocked_s - first_step:6.2f} s after the first step "
                  f"({first_step:.2f} s in it), {stats.chunks} parts", flush=True)
        for world in worlds[1:]:
            print(f"ratio tokens/CPU-s world {world} / world {worlds[0]}: "
                  f"{rates[world] / rates[worlds[0]]:.3f} (goal >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e7, help="tokens per measurement")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--world", type=int, nargs="+", default=None,
                        help="measure rank 0 of these simulated world sizes instead")
    parser.add_argument("--parts", type=int, default=128, help="--world: parts in the split")
    parser.add_argument("--part-rows", type=int, default=2000, help="--world: rows per part")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=GPU_TOKENS_PER_S,
                        help="--world: the simulated model step's speed")
    args = parser.parse_args()
    if args.world:
        import torch

        torch.set_num_threads(1)
        scaling(args.world, args.parts, args.part_rows, args.seq[0], 32,
                args.gpu_tokens_per_s)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from data_prep.ray_env import init_ray

    torch.set_num_threads(1)
    ray = init_ray(None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="bertflow-input-bench-"))
    print(f"input pipeline: {os.cpu_count()} CPUs; tokens per CPU-second of the whole "
          f"process tree; cores for one GPU at {GPU_TOKENS_PER_S:,} tokens/s")
    results = {}
    try:
        for seq in args.seq:
            batch_size = 256 if seq <= 128 else 64
            rows = int(args.tokens * 1.2 / seq)
            for static in (True, False):
                folder = work / f"s{seq}-{'static' if static else 'dynamic'}"
                write_dataset(folder, seq, rows, static)
                for mode in MODES:
                    per_cpu, per_wall = measure(folder, seq, batch_size, static, mode,
                                                args.tokens)
                    results[seq, static, mode] = per_cpu
                    print(f"seq {seq:4d} batch {batch_size:3d} "
                          f"{'static ' if static else 'dynamic'}  {mode:15s} "
                          f"{per_cpu:12,.0f} tokens/CPU-s  {per_wall:12,.0f} tokens/s wall  "
                          f"-> {GPU_TOKENS_PER_S / per_cpu:5.2f} cores per GPU", flush=True)
        for seq in args.seq:
            for static in (True, False):
                ref = results[seq, static, "ray collate_fn"]
                for mode in MODES[1:]:
                    print(f"ratio {mode} / ray collate_fn, seq {seq}, "
                          f"{'static' if static else 'dynamic'}: "
                          f"{results[seq, static, mode] / ref:.2f}")
        for mode in MODES[1:]:
            worst = max(GPU_TOKENS_PER_S / v for (s, st, m), v in results.items() if m == mode)
            print(f"cores one GPU needs (worst case, {mode}): {worst:.2f} (goal <= 4)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
