"""`build_pretraining_dataset(config)`: raw corpora -> Parquet instances + manifest.

How the work is cut, and why (the only module that touches Ray Data):
1. The driver checks every input path (a missing one fails before any work), hashes the
   files, and compares the build fingerprint with DIR's manifest: equal means "up to
   date" and nothing is written.
2. Inside a hidden temp folder (renamed into place at the end, so no partial DIR is ever
   visible), the driver streams each file once through `readers` and stages its
   documents in work units of `docs_per_unit` documents (one file, one split: a document
   goes to val when a hash of its text falls under `val_fraction`). Only one unit is in
   memory at a time.
3. Ray Data maps units over tasks (at most `num_workers` at a time). Each unit is seeded from (seed,
   file sha256, split, unit number) and writes its own part file named by its index, so
   rows are identical whatever the number of workers or their scheduling.
On a multi-node cluster, DIR's parent must be a filesystem every node sees (NFS, a
mounted bucket): workers read the staged units and write their parts there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bert_core.config_io import to_dict
from data_prep.config import RUNTIME_ONLY, PrepConfig
from data_prep.manifest import (Manifest, ManifestError, atomic_output_dir,
                                build_fingerprint, fingerprint_file, is_up_to_date)
from data_prep.masking import MaskingSpec
from data_prep.readers import expand_inputs, iter_documents
from data_prep.recipe import RecipeSpec, create_instances, instances_to_table, output_schema
from data_prep.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_UNIT_MAX_CHARS = 16 << 20  # a unit also closes at this much text (bounded memory)


def load_tokenizer(vocab: str, lowercase: bool) -> WordPieceTokenizer:
    """--vocab is a vocab.txt (cased per --lowercase) or a folder with its own settings."""
    p = Path(vocab)
    return WordPieceTokenizer.from_dir(p) if p.is_dir() else \
        WordPieceTokenizer.from_vocab(p, lowercase=lowercase)


def split_of(sentences: list[str], val_fraction: float) -> str:
    """train or val, from a hash of the document's text (stable across seeds and runs)."""
    if val_fraction <= 0:
        return "train"
    h = zlib.crc32("\n".join(sentences).encode("utf-8"))
    return "val" if h / 2**32 < val_fraction else "train"


def _key_config(config: PrepConfig) -> dict[str, Any]:
    # the inputs enter the fingerprint by content; runtime knobs do not change rows
    return {k: v for k, v in to_dict(config).items() if k not in RUNTIME_ONLY + ("input",)}


def stage_units(files: list[Path], inputs: list[dict[str, Any]], config: PrepConfig,
                staging: Path) -> tuple[list[dict[str, Any]], Counter]:
    """Stream every file into unit files of documents; returns (units, read counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging.mkdir(parents=True, exist_ok=True)
    units: list[dict[str, Any]] = []
    stats: Counter = Counter()
    for file, info in zip(files, inputs):
        buffers: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
        sizes = dict.fromkeys(SPLITS, 0)
        numbers = dict.fromkeys(SPLITS, 0)

        def flush(split: str) -> None:
            docs = buffers[split]
            if not docs:
                return
            path = staging / f"unit-{len(units):06d}.parquet"
            pq.write_table(pa.table({"sentences": pa.array(docs, pa.list_(pa.string()))}), path)
            units.append({"index": len(units), "path": str(path), "split": split,
                          "file_sha256": info["sha256"], "number": numbers[split],
                          "documents": len(docs)})
            numbers[split] += 1
            buffers[split], sizes[split] = [], 0

        for doc in iter_documents(file, stats, text_field=config.text_field,
                                  max_line_bytes=config.max_line_bytes):
            split = split_of(doc, config.val_fraction)
            buffers[split].append(doc)
            sizes[split] += sum(map(len, doc))
            if len(buffers[split]) >= config.docs_per_unit or sizes[split] >= _UNIT_MAX_CHARS:
                flush(split)
        for split in SPLITS:
            flush(split)
    return units, stats


def unit_seed(seed: int, unit: dict[str, Any]) -> np.random.SeedSequence:
    """Seed of a unit from (seed, file sha256, split, unit number): no dependence on
    which worker runs it or when."""
    return np.random.SeedSequence([seed, int(unit["file_sha256"][:16], 16),
                                   SPLITS.index(unit["split"]), unit["number"]])


def process_unit(unit: dict[str, Any], tokenizer: WordPieceTokenizer, spec: RecipeSpec,
                 seed: int, out_dir: Path) -> dict[str, Any]:
    """Tokenize one staged unit, build its instances, write `SPLIT/part-INDEX.parquet`.

    Returns the unit's counts (documents used/skipped, sentences, instances, tokens,
    masked tokens) and the part file written, if any."""
    import time

    import pyarrow.parquet as pq

    started = time.perf_counter()
    docs_text = pq.read_table(unit["path"]).column("sentences").to_pylist()
    flat = [s for doc in docs_text for s in doc]
    ids = tokenizer.encode_batch(flat)
    documents, k, no_tokens, sentences = [], 0, 0, 0
    for doc in docs_text:
        sents = [s for s in ids[k:k + len(doc)] if s]
        k += len(doc)
        if sents:
            documents.append(sents)
            sentences += len(sents)
        else:
            no_tokens += 1
    rng = np.random.default_rng(unit_seed(seed, unit))
    instances = create_instances(documents, spec, rng) if documents else []
    result: dict[str, Any] = {
        "index": unit["index"], "split": unit["split"], "documents_used": len(documents),
        "skipped.no_tokens": no_tokens, "sentences": sentences, "instances": len(instances),
        "tokens": int(sum(x.input_ids.shape[0] for x in instances)),
        "masked_tokens": int(sum(x.positions.shape[0] for x in instances
                                 if x.positions is not None)),
        "file": None}
    if instances:
        table = instances_to_table(instances, spec.objective, spec.masking is not None)
        rel = f"{unit['split']}/part-{unit['index']:06d}.parquet"
        (out_dir / unit["split"]).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out_dir / rel)
        result["file"] = {"path": rel, "size": (out_dir / rel).stat().st_size,
                          "rows": table.num_rows}
    result["seconds"] = time.perf_counter() - started  # for the log, not the manifest
    return result


def recipe_spec(config: PrepConfig, tokenizer: WordPieceTokenizer) -> RecipeSpec:
    masking = None
    if config.masking == "static":
        masking = MaskingSpec.from_tokenizer(tokenizer, config.masked_lm_prob,
                                             config.max_predictions_per_seq,
                                             config.whole_word_mask)
    return RecipeSpec(max_seq_len=config.max_seq_len, objective=config.objective,
                      short_seq_prob=config.short_seq_prob, cls_id=tokenizer.cls_id,
                      sep_id=tokenizer.sep_id, dupe_factor=config.dupe_factor,
                      masking=masking)


_WORKER_STATE: dict[str, tuple[PrepConfig, WordPieceTokenizer, RecipeSpec]] = {}


def build_units(batch: dict[str, Any], tokenizer_dir: str, config: dict[str, Any],
                out_dir: str) -> dict[str, Any]:
    """Ray Data task: process a batch of units. The tokenizer and recipe are built once
    per worker process (Ray reuses task workers), which starts far faster than an actor
    pool and keeps the output independent of scheduling."""
    key = json.dumps([tokenizer_dir, config], sort_keys=True)
    if key not in _WORKER_STATE:
        from bert_core.config_io import from_dict

        cfg = from_dict(PrepConfig, config, "prep config")
        tok = WordPieceTokenizer.from_dir(tokenizer_dir)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (cfg, tok, recipe_spec(cfg, tok))
    cfg, tok, spec = _WORKER_STATE[key]
    results = [process_unit(json.loads(u), tok, spec, cfg.seed, Path(out_dir))
               for u in batch["unit"]]
    return {"result": [json.dumps(r) for r in results]}


def run_units(units: list[dict[str, Any]], tokenizer_dir: Path, config: PrepConfig,
              out_dir: Path) -> list[dict[str, Any]]:
    """Process all units on Ray Data; results in unit order."""
    from tqdm import tqdm

    from data_prep.ray_env import init_ray

    if not units:
        return []
    ray = init_ray(config.address)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # one tqdm bar over units is clearer
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    workers = config.num_workers or max(1, int(total_cpus))
    workers = min(workers, len(units))
    # Fractions so a small (2-core) cluster can also run Ray Data's own tasks.
    cpus = min(1.0, max(0.1, total_cpus / (workers + 1)))
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units],
                             override_num_blocks=len(units))
    ds = ds.map_batches(build_units, batch_size=1, num_cpus=cpus,
                        compute=ray.data.TaskPoolStrategy(size=workers),
                        fn_kwargs={"tokenizer_dir": str(tokenizer_dir),
                                   "config": to_dict(config), "out_dir": str(out_dir)})
    results = []
    started = time.perf_counter()
    try:
        with tqdm(total=len(units), desc="prep units", unit="unit", mininterval=2.0) as bar:
            for row in ds.iter_rows():
                results.append(json.loads(row["result"]))
                bar.update(1)
    finally:
        ctx.enable_progress_bars = bars
    log.info("%d units: %.1f s of work in %.1f s on %d worker(s)", len(units),
             sum(r["seconds"] for r in results), time.perf_counter() - started, workers)
    return sorted(results, key=lambda r: r["index"])


def _counts(read: Counter, results: list[dict[str, Any]], n_files: int) -> dict[str, Any]:
    skipped = {k.split(".", 1)[1]: v for k, v in sorted(read.items()) if k.startswith("skipped.")}
    no_tokens = sum(r["skipped.no_tokens"] for r in results)
    if no_tokens:
        skipped["no_tokens"] = no_tokens
    counts: dict[str, Any] = {
        "files": n_files,
        "files_skipped": {k.split(".", 1)[1]: v for k, v in sorted(read.items())
                          if k.startswith("files_skipped.")},
        "documents_read": read["documents_read"],
        "documents_used": sum(r["documents_used"] for r in results),
        "documents_skipped": skipped,
        "oversize_documents_split": read["oversize_documents_split"],
    }
    for key in ("sentences", "instances", "tokens", "masked_tokens"):
        counts[key] = sum(r[key] for r in results)
    for split in SPLITS:
        counts[split] = {key: sum(r[key] for r in results if r["split"] == split)
                         for key in ("documents_used", "instances", "tokens", "masked_tokens")}
    return counts


def build_pretraining_dataset(config: PrepConfig) -> Manifest:
    """Build (or find up to date) the dataset described by `config`; returns its manifest."""
    from tqdm import tqdm

    config.validate_for_run()
    files = expand_inputs(config.input)  # a missing path fails here, before any work
    out = Path(config.output).absolute()
    # an output folder inside an input folder must not be read back as corpus
    files = [f for f in files if out.resolve() not in f.parents]
    tokenizer = load_tokenizer(config.vocab, config.lowercase) if config.vocab else None
    inputs = [fingerprint_file(f) for f in tqdm(files, desc="hashing inputs", unit="file",
                                                 disable=len(files) < 20)]
    tok_key = tokenizer.fingerprint() if tokenizer else f"train-vocab:{config.train_vocab}"
    fingerprint = build_fingerprint(_key_config(config), inputs, tok_key)
    if not config.force:
        fresh, reason = is_up_to_date(out, fingerprint)
        if fresh:
            log.info("%s is up to date; nothing to do (pass --force to rebuild)", out)
            return Manifest.load(out)
        if out.exists():
            log.info("rebuilding %s: %s", out, reason)
    is_ours = (out / "manifest.json").is_file()
    if out.exists() and not (is_ours or config.force):
        raise ManifestError(f"{out} exists and is not a bertflow dataset; choose another "
                            "--output or pass --force to replace it")
    stored = to_dict(config)
    stored["input"] = [str(Path(p).expanduser().absolute()) for p in config.input]
    stored["output"] = str(out)
    with atomic_output_dir(out, force=out.exists()) as tmp:
        log.info("reading %d file(s) into work units", len(files))
        units, read = stage_units(files, inputs, config, tmp / "_staging")
        if tokenizer is None:
            tokenizer = _train_vocab(units, config)
        tokenizer.save(tmp / "tokenizer")
        for split in SPLITS:
            (tmp / split).mkdir()
        log.info("building instances from %d document(s) in %d unit(s)",
                 read["documents_read"], len(units))
        results = run_units(units, tmp / "tokenizer", config, tmp)
        shutil.rmtree(tmp / "_staging")
        counts = _counts(read, results, len(files))
        accounted = counts["documents_used"] + sum(counts["documents_skipped"].values())
        if accounted != counts["documents_read"]:  # a bug, not bad input: fail loudly
            raise RuntimeError(f"document accounting mismatch: read "
                               f"{counts['documents_read']}, accounted {accounted}")
        schema = output_schema(config.objective, config.masking == "static")
        manifest = Manifest(
            kind="pretraining", config=stored, inputs=inputs,
            tokenizer={"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                       **tokenizer.settings(), "path": "tokenizer"},
            counts=counts,
            splits={s: {"files": [r["file"] for r in results if r["split"] == s and r["file"]],
                        "instances": counts[s]["instances"]} for s in SPLITS},
            schema={f.name: str(f.type) for f in schema}, fingerprint=fingerprint,
            extra={"units": len(units), "docs_per_unit": config.docs_per_unit})
        manifest.save(tmp)
    log.info("wrote %s: %d train / %d val instances, %d tokens", out,
             counts["train"]["instances"], counts["val"]["instances"], counts["tokens"])
    return manifest


def _train_vocab(units: list[dict[str, Any]], config: PrepConfig) -> WordPieceTokenizer:
    import pyarrow.parquet as pq

    def sentences():
        for unit in units:
            if unit["split"] != "train":
                continue
            for doc in pq.read_table(unit["path"]).column("sentences").to_pylist():
                yield from doc

    log.info("training a WordPiece vocabulary of %d tokens", config.train_vocab)
    return WordPieceTokenizer.train(sentences(), config.train_vocab, config.lowercase)
