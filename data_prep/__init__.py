"""data_prep: turns raw text into tokenized, masked, paired datasets (Parquet + manifest).

Pure functions on numpy/pyarrow batches; `pipeline.py` alone runs prep's Ray tasks.
Names are resolved lazily so that importing the config does not start ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "PrepConfig": "data_prep.config",
    "build_pretraining_dataset": "data_prep.pipeline",
    "Manifest": "data_prep.manifest",
    "atomic_output_dir": "data_prep.manifest",
    "fingerprint_file": "data_prep.manifest",
    "is_up_to_date": "data_prep.manifest",
    "open_dataset": "data_prep.manifest",
    "output_location": "data_prep.manifest",
    "open_location": "data_prep.storage",
    "check_location": "data_prep.storage",
    "WordPieceTokenizer": "data_prep.tokenizer",
    "mask_tokens": "data_prep.masking",
    "MaskingSpec": "data_prep.masking",
    "collate_pretraining": "data_prep.collate",
    "batch_rng": "data_prep.collate",
    "iter_collated": "data_prep.collate",
    "init_ray": "data_prep.ray_env",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
