"""data_prep: turns raw text into tokenized, masked, paired datasets (Parquet + manifest).

Pure functions on numpy/pyarrow batches; `pipeline.py` alone builds the Ray Data graph.
Names are resolved lazily so that importing the config does not start ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "PrepConfig": "data_prep.config",
    "build_pretraining_dataset": "data_prep.pipeline",
    "Manifest": "data_prep.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
