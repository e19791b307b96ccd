"""Every shipped configs/*.yaml loads into its stage's dataclass (unknown keys are errors)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bert_core.config_io import ConfigError, from_dict, load, read_mapping

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file name prefix -> the dataclass it mirrors
CLASSES = {"prep": "data_prep.config:PrepConfig",
           "pretrain": "workflows.config:PretrainConfig",
           "finetune": "workflows.config:FinetuneConfig"}


def config_class(path: Path) -> type:
    for prefix, target in CLASSES.items():
        if path.name.startswith(prefix):
            module, name = target.split(":")
            return getattr(importlib.import_module(module), name)
    raise AssertionError(f"{path.name}: no stage for this name; start it with one of "
                         f"{', '.join(CLASSES)}")


YAMLS = sorted(CONFIGS.glob("*.yaml"))


def test_there_are_configs_for_each_stage():
    prefixes = {p.name.split("_")[0].split(".")[0] for p in YAMLS}
    assert {"prep", "finetune"} <= prefixes


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads_into_its_dataclass(path):
    cls = config_class(path)
    data = read_mapping(path)
    assert data, f"{path.name} is empty"
    # Required fields may legitimately be left to the command line: supply placeholders
    # only for those, so every key in the file is still checked against the dataclass.
    try:
        cfg = load(cls, path)
    except ConfigError as exc:
        if "unknown key" in str(exc):
            raise
        filled = {"input": ["corpus.txt"], "output": "out", "data": "data", "run_name": "r",
                  "base": "models:/bert@champion", "train": "train.csv"}
        cfg = from_dict(cls, {**{k: v for k, v in filled.items()
                                 if k in cls.__dataclass_fields__ and k not in data}, **data},
                        str(path))
    for key, value in data.items():
        got = getattr(cfg, key)
        assert got == value or (isinstance(value, list) and list(got) == value), key


def test_a_misspelt_key_is_rejected_naming_the_file(tmp_path):
    bad = tmp_path / "prep_typo.yaml"
    bad.write_text("input: [a.txt]\noutput: out\nmax_seq_length: 128\n")
    with pytest.raises(ConfigError, match=r"prep_typo.yaml.*max_seq_length.*max_seq_len"):
        load(config_class(bad), bad)
