"""Importing a Hugging Face-format BERT folder (e.g. MiniLM) into the registry as a base
model: `bertflow registry import-hf DIR --name NAME`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from workflows import tracking as t

log = logging.getLogger(__name__)

# Files of a Hugging Face BERT folder that a bertflow model needs (others, such as a
# sentence-transformers pooling config, are not copied into the registry).
HF_MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.json", "bertflow.json")


class HFImportError(BertflowError):
    """A folder is not a Hugging Face-format BERT that bertflow can import."""


def config_hash(model_dir: Path) -> str:
    """sha256 of the model's config.json with keys sorted (formatting does not count)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def check_hf_bert_folder(model_dir: Path) -> dict[str, Any]:
    """The config of a Hugging Face-format BERT folder, or a HFImportError saying what is
    missing. Only safetensors weights are accepted (pickled .bin files are never loaded).
    A symbolic link among the files to import is refused: a received folder could point
    one at a local secret and have it copied into the registry."""
    if not model_dir.is_dir():
        raise HFImportError(f"{model_dir}: no such folder")
    for f in HF_MODEL_FILES:
        if (model_dir / f).is_symlink():
            raise HFImportError(
                f"{model_dir / f} is a symbolic link (to {(model_dir / f).readlink()}); "
                f"bertflow imports plain files only. Check where it points, then copy the "
                f"folder with its links resolved (cp -rL) and import the copy")
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt")
               if not (model_dir / f).is_file()]
    if missing:
        hint = (" (pytorch_model.bin is not accepted: convert it to safetensors first)"
                if (model_dir / "pytorch_model.bin").exists() else "")
        raise HFImportError(f"{model_dir}: not a Hugging Face-format BERT folder, missing "
                            f"{', '.join(missing)}{hint}")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HFImportError(f"{model_dir / 'config.json'}:{exc.lineno}: invalid JSON") from None
    if config.get("model_type", "bert") != "bert":
        raise HFImportError(f"{model_dir / 'config.json'}: model_type is "
                            f"{config.get('model_type')!r}; bertflow imports BERT models only")
    from workflows.transfer import check_model_folder

    check_model_folder(model_dir)  # config.json against the weights, nothing allocated
    return config


def import_hf(model_dir: str | Path, name: str, tracking_uri: str | None = None,
              experiment: str = "bertflow") -> Any:
    """Register an existing Hugging Face-format BERT folder (e.g. MiniLM) as a base model.

    A run named `import-NAME` records the source path, the config hash and the architecture;
    the model files are logged as a bertflow pyfunc and registered as a new version of
    `name` (task "base"). Returns the ModelVersion.
    """
    t.check_model_name(name)
    src = Path(model_dir).expanduser().resolve()
    config = check_hf_bert_folder(src)
    uri = t.resolve_tracking_uri(tracking_uri)
    digest = config_hash(src)
    tags = {t.TAG_SOURCE_PATH: str(src), t.TAG_CONFIG_HASH: digest, t.TAG_TASK: "base",
            t.TAG_BASE_MODEL: str(src)}
    arch = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size", "max_position_embeddings")
            if k in config}
    with tempfile.TemporaryDirectory(prefix="bertflow-import-") as tmp:
        # Copy only what a bertflow model needs, so the registry holds no stray files.
        staged = Path(tmp) / "model"
        staged.mkdir()
        for f in HF_MODEL_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, staged / f, follow_symlinks=False)
        run_id = t.open_run(uri, experiment, f"import-{name}", tags=tags,
                            params={"source_path": str(src), "config_sha256": digest, **arch})
        _, version = t.log_and_register(staged, run_id=run_id, uri=uri, task="base",
                                        tags=tags, register_as=name)
    log.info("imported %s as %s version %s", src, name, version)
    return t.client(uri).get_model_version(name, version)
