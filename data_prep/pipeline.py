"""`build_pretraining_dataset(config)`: raw corpora -> Parquet instances + manifest.

How the work is cut, and why (the only module that runs prep's Ray tasks):
1. The driver checks the output and every input location (a missing, unreachable or
   occupied one fails before any work), hashes the files, and compares the build
   fingerprint with DIR's manifest: equal means "up to date" and nothing is written.
2. In the staging area (below: a temp folder renamed into place, or a prefix published
   by its manifest, so no partial DIR is ever read), the driver streams each file once through `readers` and stages its
   documents in work units of at most `docs_per_unit` documents of one file and one split
   (a document goes to val when a hash of its text falls under `val_fraction`). Only one
   unit is in memory at a time. Units only cut the work: rows do not depend on them.
3. Tokenize (one task per unit): each unit's documents are written tokenized
   (`corpus.py` format). On this machine alone (`tokenizes_in_driver`) the driver does it
   instead as each unit closes, on `processes.PrepProcesses` (one per core, each with the
   tokenizer on one thread): no unit text is staged. The tokens files are the same. The
   driver then numbers every document of a split, in reading order: that is the
   corpus-wide index NSP draws its random next segments from.
4. Instances (one task per unit): each document's instances come from a generator seeded
   by (seed, split, document number), so rows do not depend on the number of workers or
   on unit size; random next segments are read from any unit of the split by index
   (`SplitPool`). Every instance gets a random 63-bit key from the same generator and
   goes to shuffle bucket `key % buckets`; a unit writes its instances bucket by bucket
   to an Arrow file, a few million tokens at a time.
5. Shuffle (one task per bucket): a bucket's instances from every unit, sorted by key,
   become `SPLIT/part-BUCKET.parquet`. The split is thus shuffled as a whole (a
   permutation fixed by the seed), with memory bounded by a bucket (about 64 MB; the
   number of buckets follows from the split's token count, never from the workers).
   Ray Data's own `random_shuffle` would hold the whole split in the object store.
Where the passes run (`run_tasks`, `tokenize_workers` items at a time): with no
`--address` and no Ray in this process, on this machine's `PrepProcesses`, the processes
that tokenized, with no Ray at all (a private local Ray's start took about 5 s of the 2
cores and 0.8 GB while the instance pass ran); a pass too small to be worth starting them
runs in this process. On a cluster (`--address`, or a Ray this process runs), as plain Ray
tasks: on 2 cores Ray Data's task pool kept about one of two busy. `--tokenize-on ray`
runs every pass on Ray tasks, with no `--address` on a private local Ray. Rows never
depend on the schedule.
Where things live. Every intermediate a task reads or writes lives on the OUTPUT's
filesystem, opened through `pyarrow.fs` (`data_prep.storage`), never only on the driver:
- a local DIR (or file://): a hidden temp sibling `.DIR.tmp-PID/` holds the staging
  folder `_staging/` and the dataset, and is renamed into place at the end (stale temp
  folders of killed runs are removed). On a multi-node cluster such a DIR must be on a
  filesystem every node mounts (NFS); otherwise use a URI.
- a URI (`s3://bucket/datasets/wiki128`, any store pyarrow.fs resolves): nothing can be
  renamed there, so the dataset is published (`manifest.output_location`): a `_BUILDING`
  marker, the old manifest deleted first, units/tokens/instances under
  `DIR/_staging-<token>/`, parts and tokenizer under DIR, the staging prefix deleted,
  `manifest.json` written last in one PUT. Readers trust only a DIR whose manifest loads.
  The NSP pool reads the staged tokens through a block cache (`corpus.SplitPool`). Unlike
  a local rebuild, which keeps the old DIR until the new one is renamed over it, a
  rebuild on an object store unpublishes the old dataset first: if it fails, DIR holds no
  dataset until a build succeeds (do not rebuild a dataset a training is reading).
  Object-store inputs are read twice (hashed, then read), as local ones are.
Inputs may be URIs too (`readers.expand_locations`). Rows depend only on the inputs'
bytes, the config and the seed: a build to s3:// and a local build give byte-identical
parts. The store's credentials come from its standard variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...); the driver checks every location before any Ray work starts
(`storage.check_location`) and hands the variables to the Ray tasks through their
runtime environment (`ray_env.init_ray`; on a Ray started without them, as an object the
tasks apply, `ray_env.env_for_tasks`; never as task options, which Ray logs). A
manifest stores locations without user info (`storage.public_uri`; a URI with a query
string is refused), and no credential is ever logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bert_core.config_io import to_dict
from data_prep.config import FINGERPRINT_NAMES, RUNTIME_ONLY, PrepConfig
from data_prep.manifest import (BUILDING_MARKER, MANIFEST_NAME, STAGING_PREFIX, Manifest,
                                ManifestError, build_fingerprint, fingerprint_file,
                                is_dataset_folder, is_up_to_date, output_location)
from data_prep.masking import MaskingSpec
from data_prep.readers import expand_locations, iter_documents
from data_prep.corpus import SplitPool, read_tokenized_arrays
from data_prep.recipe import (InstanceColumns, RecipeSpec, UnitRows, mask_columns,
                              output_schema)
from data_prep.seeds import SPLITS, DocGenerators
from data_prep.storage import (Location, check_location, is_local, is_uri, open_location,
                               public_uri)
from data_prep.ray_env import usable_cpus
from data_prep.processes import PrepProcesses, tokenize_documents
from data_prep.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

_UNIT_MAX_CHARS = 16 << 20  # a unit also closes at this much text (bounded memory)
_TOKENIZE_THREADS = 3  # driver threads calling the tokenizer (each unit's text held)


def mark_stage(name: str) -> None:
    """Log the start of a stage of the build at DEBUG (bench/prep_throughput.py times
    the stages, and the cores they keep busy, by these marks)."""
    log.debug("stage %s", name)


def load_tokenizer(vocab: str, lowercase: bool) -> WordPieceTokenizer:
    """--vocab is a vocab.txt (cased per --lowercase) or a folder with its own settings;
    either may be a URI."""
    if is_uri(vocab) and not is_local(vocab):
        loc = check_location(vocab, "--vocab", must_exist=True)
        if loc.is_dir():
            return WordPieceTokenizer.from_dir(loc.uri)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bertflow-vocab-") as tmp:
            local = Path(tmp) / "vocab.txt"
            local.write_bytes(loc.read_bytes())
            return WordPieceTokenizer.from_vocab(local, lowercase=lowercase)
    p = Path(open_location(vocab).path)
    return WordPieceTokenizer.from_dir(p) if p.is_dir() else \
        WordPieceTokenizer.from_vocab(p, lowercase=lowercase)


def _write_parquet(table: Any, loc: Location) -> None:
    import pyarrow.parquet as pq

    if loc.local:
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, loc.path, filesystem=loc.fs)


def _read_parquet(location: str) -> Any:
    import pyarrow.parquet as pq

    loc = open_location(location)
    return pq.read_table(loc.path, filesystem=loc.fs)


def split_of(sentences: list[str], val_fraction: float) -> str:
    """train or val, from a hash of the document's text (stable across seeds and runs)."""
    if val_fraction <= 0:
        return "train"
    h = zlib.crc32("\n".join(sentences).encode("utf-8"))
    return "val" if h / 2**32 < val_fraction else "train"


def _key_config(config: PrepConfig) -> dict[str, Any]:
    # the inputs enter the fingerprint by content; runtime knobs do not change rows
    return {FINGERPRINT_NAMES.get(k, k): v for k, v in to_dict(config).items()
            if k not in RUNTIME_ONLY + ("input",)}


def stage_units(files: list[str], inputs: list[dict[str, Any]], config: PrepConfig,
                staging: str | Path, tokenizer: WordPieceTokenizer | None = None,
                processes: PrepProcesses | None = None
                ) -> tuple[list[dict[str, Any]], Counter]:
    """Stream every file (path or URI) into work units under `staging` (a path or URI);
    returns (units, read counts).

    Without `tokenizer` a unit is a Parquet file of its documents' text, for the tokenize
    pass. With one, pass 1 runs here, each unit tokenized as it closes while the next is
    read, and the unit carries its `tokenized` result: the first unit of each split on
    this process, the others on `processes` (`PrepProcesses` started with this tokenizer;
    by default one per CPU, or `tokenize_workers`), each with the tokenizer on one thread,
    holding at most that many units of text plus two; with one process, all of them in
    this process, on the tokenizer's own threads, from three threads of this process (so
    that their Python work on each result overlaps the others' tokenizing)."""
    import pyarrow as pa

    stage = open_location(staging)
    units: list[dict[str, Any]] = []
    stats: Counter = Counter()
    pending: list[tuple[dict[str, Any], Any]] = []  # units being tokenized, in order
    with ExitStack() as closing:
        if tokenizer is not None and processes is None:
            processes = closing.enter_context(
                PrepProcesses(config.tokenize_workers or usable_cpus(), tokenizer))
        many = tokenizer is not None and processes is not None and processes.processes > 1
        # the first unit of each split on this process's threads: a corpus of one unit per
        # split starts no process
        in_flight = processes.processes + 1 if many else _TOKENIZE_THREADS
        split_started: set[str] = set()
        threads = closing.enter_context(
            ThreadPoolExecutor(_TOKENIZE_THREADS, thread_name_prefix="bertflow-tokenize"))

        def submit(docs: list[list[str]], index: int, split: str) -> Any:
            if not many or split not in split_started:
                split_started.add(split)
                return threads.submit(tokenize_documents, docs, index, tokenizer, staging)
            return processes.tokenize(docs, index, str(staging))

        def settle(keep: int) -> None:
            while len(pending) > keep:
                unit, future = pending.pop(0)
                unit["tokenized"] = PrepProcesses.result(future)

        for file, info in zip(files, inputs):
            buffers: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
            sizes = dict.fromkeys(SPLITS, 0)
            numbers = dict.fromkeys(SPLITS, 0)

            def flush(split: str) -> None:
                docs = buffers[split]
                if not docs:
                    return
                unit = {"index": len(units), "split": split, "file_sha256": info["sha256"],
                        "number": numbers[split], "documents": len(docs)}
                if tokenizer is None:
                    loc = stage.join(f"unit-{len(units):06d}.parquet")
                    _write_parquet(pa.table({"sentences": pa.array(docs, pa.list_(pa.string()))}),
                                   loc)
                    unit["path"] = loc.uri
                else:
                    settle(in_flight - 1)
                    pending.append((unit, submit(docs, unit["index"], split)))
                units.append(unit)
                numbers[split] += 1
                buffers[split], sizes[split] = [], 0

            for doc in iter_documents(file, stats, text_field=config.text_column,
                                      max_line_bytes=config.max_line_bytes,
                                      max_decompressed_bytes=config.max_decompressed_bytes):
                split = split_of(doc, config.val_fraction)
                buffers[split].append(doc)
                sizes[split] += sum(map(len, doc))
                if len(buffers[split]) >= config.docs_per_unit or \
                        sizes[split] >= _UNIT_MAX_CHARS:
                    flush(split)
            for split in SPLITS:
                flush(split)
        settle(0)
    return units, stats


_BUCKET_BYTES = 64 << 20   # target size of one shuffle bucket (one output part)
_MIN_PARTS = 64            # parts of a split of at least 64 MB (one per training stream)
_MIN_PART_BYTES = 1 << 20  # the default rule never makes parts smaller than this
_FLUSH_TOKENS = 4 << 20    # instance tokens a unit task holds before writing them out
_MASK_GROUP_TOKENS = 1 << 18  # instance tokens masked at once (vectorised; bounded memory)


def num_buckets(corpus_tokens: int, config: PrepConfig) -> int:
    """Shuffle buckets (= output parts) of a split: `--num-parts`, else enough that each
    holds at most about `_BUCKET_BYTES` of rows and, once the split holds that much, at
    least `_MIN_PARTS` of them (training workers read disjoint parts: a split of a few
    large parts could not be shared by many workers), never parts under `_MIN_PART_BYTES`.
    Estimated from the split's token count, so it is the same on any cluster."""
    if config.num_parts:
        return config.num_parts
    per_token = 5 + (8 * config.masked_lm_prob if config.masking == "static" else 0)
    estimate = int(corpus_tokens * config.dupe_factor * per_token)
    by_size = -(-estimate // _BUCKET_BYTES)
    return max(1, by_size, min(_MIN_PARTS, estimate // _MIN_PART_BYTES))


def tokenize_unit(unit: dict[str, Any], tokenizer: WordPieceTokenizer,
                  staging: str | Path) -> dict[str, Any]:
    """Pass 1 on Ray: `tokenize_documents` of one staged unit (its Parquet text)."""
    started = time.perf_counter()
    docs_text = _read_parquet(unit["path"]).column("sentences").to_pylist()
    result = tokenize_documents(docs_text, unit["index"], tokenizer, staging)
    return {**result, "split": unit["split"], "seconds": time.perf_counter() - started}


def instance_unit(unit: dict[str, Any], spec: RecipeSpec, seed: int, pool: SplitPool,
                  staging: str | Path) -> dict[str, Any]:
    """Pass 2: the instances of one unit's documents, bucketed for the shuffle.

    `unit` carries its tokens file, split, `first_doc` (its first document's number in
    the split) and `buckets`. Writes an Arrow file holding, per flush, one record batch
    per bucket (batch i belongs to bucket i % buckets), each sorted by key."""
    import pyarrow as pa

    started = time.perf_counter()
    n_buckets, split = unit["buckets"], unit["split"]
    static = spec.masking is not None
    schema = output_schema(spec.objective, static).append(pa.field("key", pa.int64()))
    target = open_location(staging).join(f"instances-{unit['index']:06d}.arrow")
    counts = {"instances": 0, "tokens": 0, "masked_tokens": 0}
    buffer: list[InstanceColumns] = []
    keys: list[np.ndarray] = []
    held = 0
    with target.open_output_stream() as sink, pa.ipc.new_file(sink, schema) as writer:

        def flush() -> None:
            key = np.concatenate(keys)
            table = InstanceColumns.concat(buffer).to_table(spec.objective, static)
            table = table.append_column("key", pa.array(key))
            bucket = key % n_buckets
            order = np.lexsort((key, bucket))
            batch = table.take(pa.array(order)).combine_chunks().to_batches()[0]
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            for b in range(n_buckets):
                writer.write_batch(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))
            buffer.clear()
            keys.clear()

        # documents paired but not yet masked: masked together as columns
        # (`mask_columns`), each from its own generator, which then draws its
        # instances' shuffle keys
        docs, sents, tokens = read_tokenized_arrays(unit["tokens_path"])
        rows = UnitRows(tokens, spec)
        doc_bounds, sent_bounds = docs.tolist(), sents.tolist()
        generators = DocGenerators(seed, split, unit["first_doc"], len(doc_bounds) - 1)
        group: list[tuple[np.random.Generator, int]] = []
        group_tokens = 0

        def settle() -> None:
            if not group:
                return
            columns = mask_columns(rows.columns(), [n for _, n in group],
                                   [r for r, _ in group], spec.masking)
            for rng, n in group:
                keys.append(rng.integers(0, 2**63 - 1, n, dtype=np.int64))
            generators.give_back([rng for rng, _ in group])
            if len(columns):
                counts["masked_tokens"] += int(columns.position_offsets[-1]) if static else 0
                buffer.append(columns)
            group.clear()

        for local in range(len(doc_bounds) - 1):
            index = unit["first_doc"] + local
            rng = generators.next()
            n, n_tokens = rows.add(sent_bounds[doc_bounds[local]:doc_bounds[local + 1] + 1],
                                   index, pool, rng)
            group.append((rng, n))
            counts["instances"] += n
            counts["tokens"] += n_tokens
            held += n_tokens
            group_tokens += n_tokens
            if group_tokens >= _MASK_GROUP_TOKENS or held >= _FLUSH_TOKENS:
                settle()
                group_tokens = 0
            if held >= _FLUSH_TOKENS:
                flush()
                held = 0
        settle()
        if buffer:
            flush()
    return {"index": unit["index"], "instances_path": target.uri, **counts,
            "seconds": time.perf_counter() - started}


def merge_bucket(task: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Pass 3: one bucket's instances from every unit of a split, sorted by key, as
    `SPLIT/part-BUCKET.parquet` under `out_dir` (a path or URI; None when the bucket is
    empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    started = time.perf_counter()
    n, b = task["buckets"], task["bucket"]
    batches, schema = [], None
    sources = []
    for path in json.loads(open_location(task["units_file"]).read_text()):
        loc = open_location(path)
        # local: mapped pages; elsewhere: one ranged read per record batch of this bucket
        source = pa.memory_map(loc.path) if loc.local else loc.open_input_file()
        sources.append(source)
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        batches += [reader.get_batch(i) for i in range(b, reader.num_record_batches, n)]
    result: dict[str, Any] = {"split": task["split"], "bucket": b, "file": None}
    table = pa.Table.from_batches(batches, schema) if schema is not None else None
    if table is not None and table.num_rows:
        order = pc.sort_indices(table, sort_keys=[("key", "ascending")])
        table = table.take(order).drop_columns(["key"])
        rel = f"{task['split']}/part-{b:05d}.parquet"
        part = open_location(out_dir).join(rel)
        _write_parquet(table, part)
        result["file"] = {"path": rel, "size": part.size(), "rows": table.num_rows}
    del table, batches
    for source in sources:
        source.close()
    result["seconds"] = time.perf_counter() - started
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


_WORKER_STATE: dict[str, Any] = {}


def _worker_state(tokenizer_dir: str, config: dict[str, Any]
                  ) -> tuple[PrepConfig, WordPieceTokenizer, RecipeSpec]:
    """Tokenizer and recipe, built once per worker process (Ray reuses task workers,
    which start far faster than an actor pool and keep the output independent of
    scheduling)."""
    key = json.dumps([tokenizer_dir, config], sort_keys=True)
    if _WORKER_STATE.get("key") != key:
        from bert_core.config_io import from_dict

        for pool in _WORKER_STATE.get("pools", {}).values():
            pool.close()
        cfg = from_dict(PrepConfig, config, "prep config")
        tok = WordPieceTokenizer.from_dir(tokenizer_dir)
        _WORKER_STATE.clear()
        _WORKER_STATE.update(key=key, state=(cfg, tok, recipe_spec(cfg, tok)), pools={})
    return _WORKER_STATE["state"]


def _pool(path: str) -> SplitPool:
    pools = _WORKER_STATE["pools"]
    if path not in pools:
        pools[path] = SplitPool.load(path)
    return pools[path]


def _release_worker_state() -> None:
    """Close the NSP pools `_worker_state` keeps open and forget the state (the driver,
    after running tasks itself: it outlives the build, whose staging files the pools
    hold open)."""
    for pool in _WORKER_STATE.get("pools", {}).values():
        pool.close()
    _WORKER_STATE.clear()


def run_pass(step: str, task: dict[str, Any], tokenizer_dir: str, config: dict[str, Any],
             out_dir: str, staging: str, env: Any = None) -> dict[str, Any]:
    """Ray task: one item of pass `step` (tokenize, instances or merge). Every location it
    gets is a path or URI on the output's filesystem; `env` carries the driver's
    credential variables when the Ray job does not (`ray_env.env_for_tasks`)."""
    from data_prep.ray_env import apply_worker_env

    apply_worker_env(env)
    cfg, tok, spec = _worker_state(tokenizer_dir, config)
    if step == "tokenize":
        result = tokenize_unit(task, tok, staging)
    elif step == "instances":
        result = instance_unit(task, spec, cfg.seed, _pool(task["pool"]), staging)
    elif step == "merge":
        result = merge_bucket(task, out_dir)
    else:
        raise ValueError(f"unknown prep pass {step!r}")
    return {**result, "worker": os.getpid()}


def run_tasks(step: str, items: list[dict[str, Any]], tokenizer_dir: str,
              config: PrepConfig, out_dir: str, staging: str,
              processes: PrepProcesses | None = None) -> list[dict[str, Any]]:
    """Run one pass over `items`, on `processes` (this machine, no Ray:
    `runs_on_this_machine`) or as Ray tasks, at most `tokenize_workers` (default: one per
    CPU) at a time; results come back in item order.

    On Ray: plain tasks with the driver keeping that many running (a new one as each
    ends), not a Ray Data pipeline: with Ray Data's task pool the instance pass kept 1.07
    of 2 cores busy (bench/prep_throughput.py), and its executor cost the driver CPU of
    its own. Ray reuses the worker processes, so each loads its state once
    (`_worker_state`). The tasks see the driver's store credentials: from the job's
    runtime environment (`init_ray`), or, on a Ray started without them, as an object
    they apply themselves. A failed task fails the pass (the others are cancelled); Ray
    retries a task whose worker died, which rewrites the same file. On `processes`: the
    same, one item per process at a time and one more queued; a pass too small to be
    worth starting them runs in this process (`_run_here_first`); a process that dies
    fails the pass (`ProcessDied`)."""
    from tqdm import tqdm

    if not items:
        return []
    mark_stage(step)
    results: list[dict[str, Any] | None] = [None] * len(items)
    started = time.perf_counter()
    with tqdm(total=len(items), desc=f"prep {step}", unit="task", mininterval=2.0) as bar:
        if processes is None:
            from data_prep.ray_env import init_ray

            ray = init_ray(config.address)
            first = 0
            workers, submit, capped = _pass_tasks(ray, config, len(items), step,
                                                  tokenizer_dir, out_dir, staging)
            on = f"{workers} Ray worker(s)"

            def collect(running: dict[Any, int]) -> None:
                (done,), _ = ray.wait(list(running), num_returns=1)
                results[running.pop(done)] = ray.get(done)
                bar.update(1)

            def cancel(running: dict[Any, int]) -> None:
                _cancel(ray, list(running))
        else:
            shared = (tokenizer_dir, to_dict(config), out_dir, staging)
            first = _run_here_first(step, items, results, bar, shared, processes)
            workers, capped = processes.processes, True
            on = "this process" if first == len(items) else f"{workers} local process(es)"

            def submit(item: dict[str, Any]) -> Any:
                return processes.submit(run_pass, step, item, *shared)

            def collect(running: dict[Any, int]) -> None:
                (done, *_), _ = wait(list(running), return_when=FIRST_COMPLETED)
                results[running.pop(done)] = PrepProcesses.result(done)
                bar.update(1)

            def cancel(running: dict[Any, int]) -> None:
                for future in running:
                    future.cancel()
        # when the tasks' CPU requests already let no more than `workers` run, one more
        # waits queued, so that no worker waits on this driver between two tasks
        in_flight = workers + 1 if capped else workers
        running: dict[Any, int] = {}
        try:
            for k in range(first, len(items)):
                if len(running) == in_flight:
                    collect(running)
                running[submit(items[k])] = k
            while running:
                collect(running)
        except BaseException:
            cancel(running)
            raise
    log.info("%s: %d tasks, %.1f s of work in %.1f s on %s (%d processes)", step,
             len(items), sum(r["seconds"] for r in results if r),
             time.perf_counter() - started, on, len({r.pop("worker") for r in results if r}))
    return results  # type: ignore[return-value]


# CPU seconds that starting `PrepProcesses` costs (spawning, each importing numpy, pyarrow
# and the tokenizer: about 1 s on 2 cores): a pass whose whole work would take this
# process less runs here instead.
_PROCESSES_START_S = 1.0


def runs_on_this_machine(config: PrepConfig) -> bool:
    """Whether prep's passes run on this machine's processes (`PrepProcesses`), with no
    Ray: no `--address`, no Ray running in this process, and `--tokenize-on` not `ray`
    (which runs every pass as tasks of a private local Ray). A cluster named, or a Ray
    this process already runs (a job on a cluster, the tests' shared Ray): Ray tasks."""
    import sys

    ray = sys.modules.get("ray")
    return not (config.address or config.tokenize_on == "ray"
                or (ray is not None and ray.is_initialized()))


def _run_here_first(step: str, items: list[dict[str, Any]], results: list[Any], bar: Any,
                    shared: tuple[Any, ...], processes: PrepProcesses) -> int:
    """How many of the first items this process ran before the rest go to `processes`
    (all of them: the pass is done).

    Processes already started (the tokenizing started them): none. Otherwise this process
    runs the first two items, and when the rest would take it (at the second item's own
    seconds each) less than starting the processes costs (`_PROCESSES_START_S`), or there
    is one process, it runs the rest too (a small corpus: its passes take a fraction of a
    second). Rows never depend on which process runs an item."""
    if processes.started and processes.processes > 1:
        return 0

    def run_here(k: int) -> None:
        results[k] = run_pass(step, items[k], *shared)
        bar.update(1)

    # The first item pays for the first use of what every item uses (its seconds were
    # several times the next ones'); the second one's seconds are the rate.
    try:
        probe = min(2, len(items))
        for k in range(probe):
            run_here(k)
        rest = results[probe - 1]["seconds"] * (len(items) - probe)
        if processes.processes > 1 and rest >= _PROCESSES_START_S:
            return probe
        log.info("%s: the %d tasks take this process about %.1f s: running them here", step,
                 len(items), rest + sum(r["seconds"] for r in results[:probe]))
        for k in range(probe, len(items)):
            run_here(k)
        return len(items)
    finally:
        _release_worker_state()  # its pools hold the staging files open


def _pass_tasks(ray: Any, config: PrepConfig, n_items: int, step: str, tokenizer_dir: str,
                out_dir: str, staging: str) -> tuple[int, Any, bool]:
    """(tasks at once, a function that submits one item of `step` as a Ray task, whether
    the tasks' CPU requests alone keep Ray from running more at once): at most
    `tokenize_workers` or one per CPU of the cluster, never more than the items; each
    task asks for its share of the CPUs, at most one (it is one Python thread)."""
    from data_prep.ray_env import env_for_tasks

    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    workers = min(config.tokenize_workers or max(1, int(total_cpus)), n_items)
    cpus = min(1.0, max(0.1, total_cpus / workers))
    remote = ray.remote(run_pass).options(num_cpus=cpus)
    shared = (tokenizer_dir, to_dict(config), out_dir, staging, env_for_tasks())
    capped = (workers + 1) * cpus > total_cpus + 1e-6
    return workers, lambda item: remote.remote(step, item, *shared), capped


def _cancel(ray: Any, refs: list[Any], wait_s: float = 10.0) -> None:
    """Cancel a failed pass's other tasks and take their outcomes (an error or a
    result nobody wants), so that Ray does not report them later as unhandled errors,
    in whatever this process logs next; a task still running after `wait_s` is left."""
    for ref in refs:
        ray.cancel(ref)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # the pass has already failed with its own cause
            pass


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


def check_output(config: PrepConfig) -> Location:
    """The output location, proven usable before any work: a scheme pyarrow resolves, an
    existing bucket, accepted credentials, and either free, a bertflow dataset, the
    leftovers of an unfinished build, or `--force`. Raises LocationError/ManifestError."""
    out = check_location(config.output, "--output", must_exist=False, writable=True)
    if out.local:
        occupied = out.exists()
    else:
        occupied = out.has_content()
        if occupied and out.join(BUILDING_MARKER).exists() \
                and not out.join(MANIFEST_NAME).exists():
            return out  # an unfinished build of ours: replaced without --force
    if occupied and not (is_dataset_folder(out) or config.force):
        raise ManifestError(f"{out.uri} exists and is not a bertflow dataset (no manifest.json "
                            "that loads as one); choose another --output or pass --force to "
                            "replace it")
    return out


def _outside(files: list[str], out: Location) -> list[str]:
    """Input files not under the output (an output inside an input folder must not be read
    back as corpus)."""
    if out.local:
        root = Path(out.path).resolve()
        return [f for f in files if not is_local(f) or root not in Path(f).parents]
    prefix = out.uri.rstrip("/") + "/"
    return [f for f in files if not f.startswith(prefix)]


def build_pretraining_dataset(config: PrepConfig, vocab_dir: str | None = None) -> Manifest:
    """Build (or find up to date) the dataset described by `config`; returns its manifest.

    `config.input` and `config.output` may be URIs (module docstring). Every location is
    checked before any Ray work: a bad one raises a LocationError / PrepInputError /
    ManifestError naming it (the CLI exits with 2). `vocab_dir` is a local folder holding
    the vocabulary `config.vocab` names when that is not a location (a registered model,
    `models:/NAME/VERSION`, that the caller downloaded): the tokenizer is read from it and
    `config.vocab` is what the manifest records."""
    from tqdm import tqdm

    mark_stage("check")
    config.validate_for_run()
    out = check_output(config)
    not_read: Counter = Counter()  # FIFOs, symlinks leading out: files_skipped.*
    files = expand_locations(config.input, not_read)  # missing inputs fail here
    files = _outside(files, out)
    tokenizer = (load_tokenizer(vocab_dir or config.vocab, config.lowercase)
                 if config.vocab else None)
    inputs = [fingerprint_file(f) for f in tqdm(files, desc="hashing inputs", unit="file",
                                                 disable=len(files) < 20)]
    tok_key = tokenizer.fingerprint() if tokenizer else f"train-vocab:{config.train_vocab}"
    fingerprint = build_fingerprint(_key_config(config), inputs, tok_key)
    occupied = out.exists() if out.local else out.has_content()
    if not config.force:
        fresh, reason = is_up_to_date(out, fingerprint)
        if fresh:
            log.info("%s is up to date; nothing to do (pass --force to rebuild)", out.uri)
            return Manifest.load(out)
        if occupied:
            log.info("rebuilding %s: %s", out.uri, reason)
    stored = to_dict(config)
    stored["input"] = [public_uri(p) if is_uri(p) and not is_local(p)
                       else open_location(p).path for p in config.input]
    stored["output"] = out.uri
    if stored.get("vocab"):
        stored["vocab"] = public_uri(stored["vocab"])
    if stored.get("tracking_uri"):
        stored["tracking_uri"] = public_uri(stored["tracking_uri"])
    here = runs_on_this_machine(config)
    with output_location(out.uri, force=occupied) as root, \
            PrepProcesses(config.tokenize_workers or usable_cpus(), tokenizer) as processes:
        staging = root.join(STAGING_PREFIX if root.local
                            else f"{STAGING_PREFIX}-{uuid.uuid4().hex[:12]}")
        tokenizer_dir = root.join("tokenizer").uri
        if tokenizer is not None and tokenizes_in_driver(config):
            tokenizer.save(tokenizer_dir)
            units, read = _read_and_tokenize(files, inputs, config, tokenizer, staging.uri,
                                             processes)
        else:
            mark_stage("read")
            log.info("reading %d file(s) into work units", len(files))
            units, read = stage_units(files, inputs, config, staging.uri)
            if tokenizer is None:
                tokenizer = _train_vocab(units, config)
            tokenizer.save(tokenizer_dir)
        read.update(not_read)
        if root.local:
            for split in SPLITS:
                Path(root.path, split).mkdir()
        log.info("building instances from %d document(s) in %d unit(s)",
                 read["documents_read"], len(units))
        results, buckets = _build_instances(units, root, staging, config,
                                            processes if here else None)
        counts = _counts(read, results, len(files))
        accounted = counts["documents_used"] + sum(counts["documents_skipped"].values())
        if accounted != counts["documents_read"]:  # a bug, not bad input: fail loudly
            raise RuntimeError(f"document accounting mismatch: read "
                               f"{counts['documents_read']}, accounted {accounted}")
        parts = run_tasks("merge", [{"split": s, "bucket": b, "buckets": n,
                                     "units_file": staging.join(f"instances-{s}.json").uri}
                                    for s, n in buckets.items() for b in range(n)],
                          tokenizer_dir, config, root.uri, staging.uri,
                          processes if here else None)
        processes.close()
        mark_stage("finish")
        staging.delete()
        if sum(p["file"]["rows"] for p in parts if p["file"]) != counts["instances"]:
            raise RuntimeError("shuffle lost or duplicated instances (a bug)")
        schema = output_schema(config.objective, config.masking == "static")
        manifest = Manifest(
            kind="pretraining", config=stored, inputs=inputs,
            tokenizer={"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                       **tokenizer.settings(), "path": "tokenizer"},
            counts=counts,
            splits={s: {"files": [p["file"] for p in parts if p["split"] == s and p["file"]],
                        "instances": counts[s]["instances"]} for s in SPLITS},
            schema={f.name: str(f.type) for f in schema}, fingerprint=fingerprint,
            extra={"units": len(units), "docs_per_unit": config.docs_per_unit,
                   "shuffle": {"scope": "split", "buckets": buckets},
                   "nsp_pool": "split"})
        manifest.save(root)  # last: on an object store this publishes the dataset
    log.info("wrote %s: %d train / %d val instances, %d tokens", out.uri,
             counts["train"]["instances"], counts["val"]["instances"], counts["tokens"])
    return manifest


def tokenizes_in_driver(config: PrepConfig) -> bool:
    """Whether pass 1 runs in this process as it reads (`--tokenize-on`), on
    `PrepProcesses` with no text staged. auto: yes when the passes run on this machine
    (`runs_on_this_machine`), or on a Ray cluster that is this machine alone (one node,
    this driver's). On a cluster of several nodes Ray tasks spread the work over every
    node."""
    if config.tokenize_on != "auto":
        return config.tokenize_on == "driver"
    if runs_on_this_machine(config):
        return True
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False  # a cluster named by --address: its nodes tokenize
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def _read_and_tokenize(files: list[str], inputs: list[dict[str, Any]], config: PrepConfig,
                       tokenizer: WordPieceTokenizer, staging: str, processes: PrepProcesses
                       ) -> tuple[list[dict[str, Any]], Counter]:
    """`stage_units` with pass 1 in this process and its `processes`. When the later
    passes run on Ray, it is not started meanwhile: its start (its processes, the
    workers' imports) takes CPU from the tokenizing, which uses every core (on 2 cores,
    starting it with the reading made reading and tokenizing 100 MB take 52.7 s instead of
    34.6 s, and Ray's start 10 s instead of 4.6 s)."""
    mark_stage("read+tokenize")
    log.info("reading and tokenizing %d file(s)", len(files))
    return stage_units(files, inputs, config, staging, tokenizer, processes)


def _build_instances(units: list[dict[str, Any]], root: Location, staging: Location,
                     config: PrepConfig, processes: PrepProcesses | None
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Passes 1 and 2 (on `processes`, or on Ray when None): tokenize every unit, number
    the documents of each split (the corpus-wide NSP pool), build the bucketed
    instances. Returns the per-unit results (counts) and the number of shuffle buckets of
    each split."""
    tokenizer_dir = root.join("tokenizer").uri
    if all("tokenized" in u for u in units):  # the driver tokenized while reading
        results = [{**u.pop("tokenized"), "split": u["split"]} for u in units]
    else:
        results = run_tasks("tokenize", units, tokenizer_dir, config, root.uri, staging.uri,
                            processes)
    buckets: dict[str, int] = {}
    work = []
    for split in SPLITS:
        mine = [(u, r) for u, r in zip(units, results) if u["split"] == split]
        pool_file = staging.join(f"pool-{split}.json")
        pool_file.write_text(json.dumps([[r["tokens_path"], r["documents_used"]]
                                         for _, r in mine]))
        buckets[split] = num_buckets(sum(r["corpus_tokens"] for _, r in mine), config)
        first = 0
        for u, r in mine:
            if r["documents_used"]:
                work.append({"index": u["index"], "split": split, "first_doc": first,
                             "tokens_path": r["tokens_path"], "buckets": buckets[split],
                             "pool": pool_file.uri})
            first += r["documents_used"]
    built = {r["index"]: r for r in run_tasks("instances", work, tokenizer_dir, config,
                                              root.uri, staging.uri, processes)}
    for split in SPLITS:
        paths = [built[w["index"]]["instances_path"] for w in work if w["split"] == split]
        staging.join(f"instances-{split}.json").write_text(json.dumps(paths))
    empty = {"instances": 0, "tokens": 0, "masked_tokens": 0}
    merged = [{**r, **{k: built.get(r["index"], empty)[k] for k in empty}} for r in results]
    return merged, {s: n for s, n in buckets.items()
                    if any(w["split"] == s for w in work)}


def _train_vocab(units: list[dict[str, Any]], config: PrepConfig) -> WordPieceTokenizer:
    def sentences():
        for unit in units:
            if unit["split"] != "train":
                continue
            for doc in _read_parquet(unit["path"]).column("sentences").to_pylist():
                yield from doc

    log.info("training a WordPiece vocabulary of %d tokens", config.train_vocab)
    return WordPieceTokenizer.train(sentences(), config.train_vocab, config.lowercase)
