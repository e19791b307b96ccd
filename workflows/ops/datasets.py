"""Finding prepared datasets (folders with a manifest.json) and summarising them.

ROOT may be a local folder or a URI (`s3://bucket/datasets/`): an object store is listed
once, recursively, through `pyarrow.fs`. Only a folder or prefix with a `manifest.json` is
a dataset: one whose build did not finish (files, no manifest, as a build on an object
store leaves it until it publishes by writing its manifest last) is never listed, and
nothing under a builder's `_staging-*` prefix or a hidden folder is searched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Folders never searched: environments, VCS data, stores, and in-progress/old outputs of
# data_prep.manifest.atomic_output_dir (hidden siblings).
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "mlartifacts", "__pycache__", "runs"}


def find_datasets(root: str | Path, max_depth: int = 6) -> list[Path] | list[str]:
    """Folders under `root` (itself included) holding a manifest.json, sorted by path:
    Paths for a local root, URIs for a remote one.

    A dataset's own subfolders (its splits) are not searched.
    """
    from data_prep.storage import is_local, is_uri

    if is_uri(root) and not is_local(root):
        return _find_remote(str(root), max_depth)
    if is_uri(root):
        from data_prep.storage import open_location

        root = open_location(root).path
    root = Path(root)
    found: list[Path] = []
    base_depth = len(root.resolve().parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "manifest.json" in filenames:
            found.append(here)
            dirnames[:] = []
            continue
        if len(here.resolve().parts) - base_depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    return sorted(found)


def _find_remote(root: str, max_depth: int) -> list[str]:
    """find_datasets on an object store: one recursive listing, then the same rules."""
    from data_prep.manifest import MANIFEST_NAME
    from data_prep.storage import open_location

    loc = open_location(root)
    base = loc.path.rstrip("/")
    found: list[tuple[str, ...]] = []
    for f in loc.list_files():
        rel = tuple(p for p in f.path[len(base):].split("/") if p)
        if not rel or rel[-1] != MANIFEST_NAME:
            continue
        folders = rel[:-1]
        if len(folders) > max_depth or any(
                d in SKIP_DIRS or d.startswith((".", "_")) for d in folders):
            continue
        found.append(folders)
    datasets: list[tuple[str, ...]] = []
    for folders in sorted(found, key=len):  # a dataset's own subfolders are not searched
        if not any(folders[:len(d)] == d for d in datasets):
            datasets.append(folders)
    return sorted(loc.join(*d).uri if d else loc.uri for d in datasets)


def summarize(dataset_dir: Path | str, check_inputs: bool = True) -> dict[str, Any]:
    """One dataset's manifest summary: kind, objective, instances, tokens, created, and
    whether it is up to date with its inputs (this rehashes the inputs when asked)."""
    from data_prep.manifest import Manifest, ManifestError, is_up_to_date

    row: dict[str, Any] = {"path": str(dataset_dir)}
    try:
        m = Manifest.load(dataset_dir)
    except ManifestError as exc:
        return {**row, "status": f"unreadable: {exc}"}
    counts = m.counts or {}

    def split_count(key: str) -> int | None:
        values = [s.get(key) for s in counts.values() if isinstance(s, dict) and key in s]
        return counts.get(key) if key in counts else (sum(values) if values else None)

    row.update(
        kind=m.kind,
        objective=m.config.get("objective", m.config.get("task", "-")),
        instances=split_count("instances") if split_count("instances") is not None
        else split_count("rows"),
        tokens=split_count("tokens"),
        splits=", ".join(f"{k}:{_rows(v)}" for k, v in sorted(m.splits.items())),
        created=m.created_at.replace("T", " ").rstrip("Z"),
        fingerprint=m.fingerprint[:12],
    )
    if check_inputs:
        ok, reason = is_up_to_date(dataset_dir)
        row["status"] = "up to date" if ok else f"STALE: {reason}"
    else:
        row["status"] = "not checked"
    return row


def _rows(split: Any) -> str:
    if isinstance(split, dict):
        for key in ("instances", "rows", "num_rows"):
            if key in split:
                return str(split[key])
        if "files" in split:
            return f"{len(split['files'])} files"
    return "?"


def list_datasets(root: str | Path = ".", check_inputs: bool = True) -> list[dict[str, Any]]:
    """Summaries of every prepared dataset under `root`."""
    return [summarize(d, check_inputs) for d in find_datasets(root)]  # type: ignore[arg-type]


# The settings that decide a pretraining dataset's rows, shown first by `datasets show`.
KEY_SETTINGS = ("objective", "masking", "max_seq_len", "dupe_factor", "masked_lm_prob",
                "max_predictions_per_seq", "whole_word_mask", "val_fraction", "seed",
                "vocab", "train_vocab", "lowercase", "text_column", "text_field",
                "task", "doc_stride", "max_query_len", "labels", "split", "columns")


def show_dataset(dataset_dir: str | Path, check_inputs: bool = True) -> dict[str, Any]:
    """One dataset in full: `summarize`'s row plus its settings, inputs, tokenizer, counts
    and splits (files and rows); a folder without a readable manifest is a ManifestError."""
    from data_prep.manifest import open_dataset

    loc, m = open_dataset(dataset_dir, "DIR")
    info = summarize(loc.uri if not loc.local else loc.path, check_inputs)
    info.update(
        config=m.config, inputs=m.inputs, tokenizer=m.tokenizer, counts=m.counts,
        fingerprint=m.fingerprint,
        splits={k: {"rows": _rows(v), "files": len(v.get("files", []))
                    if isinstance(v, dict) else 0} for k, v in sorted(m.splits.items())},
        format_version=m.format_version)
    return info


def render_dataset(info: dict[str, Any]) -> str:
    """`show_dataset`'s result for the terminal: what it is, how it was made, how to use it."""
    config, tok, counts = info["config"], info["tokenizer"], info["counts"]
    settings = [f"{k} {config[k]}" for k in KEY_SETTINGS if config.get(k) not in (None, "", [])
                and not (k == "train_vocab" and not config[k])]
    lines = [f"{info['path']}", f"  kind        {info['kind']}  (created {info['created']})",
             f"  status      {info['status']}",
             f"  holds       " + ", ".join(f"{k} {v['rows']} rows in {v['files']} file(s)"
                                           for k, v in info["splits"].items())
             + (f"; {info['tokens']} tokens" if info.get("tokens") else ""),
             f"  settings    {', '.join(settings)}",
             f"  tokenizer   vocab {tok.get('vocab_size', '?')}, "
             f"{'lowercase' if tok.get('lowercase', tok.get('do_lower_case')) else 'cased'}"
             ", fingerprint "
             f"{str(tok.get('fingerprint', '-'))[:12]}",
             f"  inputs      {len(info['inputs'])} file(s)"]
    lines += [f"              {i.get('path')}  ({i.get('size', '?')} bytes)"
              for i in info["inputs"][:10]]
    if len(info["inputs"]) > 10:
        lines.append(f"              ... {len(info['inputs']) - 10} more (--json)")
    skipped = counts.get("documents_skipped") or counts.get("skipped_by_reason") or {}
    if skipped:
        lines.append("  skipped     " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    lines.append(f"  fingerprint {info['fingerprint']}")
    if info["kind"] == "pretraining":
        lines.append(f"  use it      bertflow pretrain --data {info['path']} --run-name NAME")
        lines.append(f"              bertflow prep rerun {info['path']}   # rebuild if STALE")
    return "\n".join(lines)


def prepare_dataset(config: Any) -> Any:
    """`bertflow prep`: data_prep's build, with `--vocab models:/NAME@ALIAS` taken from
    the registry: the reference is pinned to its exact version (what the manifest records,
    so `prep rerun` reads the same vocabulary), the version downloaded and checked, and its
    vocab.txt / tokenizer_config.json used. Returns the manifest."""
    import dataclasses
    import logging
    import tempfile

    from data_prep.pipeline import build_pretraining_dataset
    from workflows import tracking

    if not config.vocab or tracking.parse_model_ref(config.vocab) is None:
        return build_pretraining_dataset(config)
    pin = tracking.pin_model(config.vocab, config.tracking_uri)
    logging.getLogger(__name__).info("vocabulary of %s: %s", config.vocab, pin.uri)
    with tempfile.TemporaryDirectory(prefix="bertflow-vocab-") as tmp:
        folder = pin.fetch(tmp)
        if not (folder / "vocab.txt").is_file():
            raise tracking.TrackingError(f"{pin.uri} has no vocab.txt: a model folder must "
                                         "carry its tokenizer")
        return build_pretraining_dataset(dataclasses.replace(config, vocab=pin.uri),
                                         vocab_dir=str(folder))


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
