"""Every shipped configs/*.yaml loads into its stage's dataclass (unknown keys are errors)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bert_core.config_io import ConfigError, read_mapping
from workflows.config import FinetuneConfig, PretrainConfig, config_from_mapping

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
        cfg = config_from_mapping(cls, data, str(path))
    except ConfigError as exc:
        if "unknown key" in str(exc):
            raise
        filled = {"input": ["corpus.txt"], "output": "out", "data": "data", "run_name": "r",
                  "base": "models:/bert@champion", "train": "train.csv"}
        cfg = config_from_mapping(cls, {**{k: v for k, v in filled.items()
                                           if k in cls.__dataclass_fields__ and k not in data},
                                        **data}, str(path))
    for key, value in data.items():
        got = getattr(cfg, key)
        if isinstance(value, dict):  # a settings group: every key it sets arrived
            for inner, v in value.items():
                assert getattr(got, inner) == v, f"{key}.{inner}"
            continue
        assert got == value or (isinstance(value, list) and list(got) == value), key


def test_a_misspelt_key_is_rejected_naming_the_file(tmp_path):
    bad = tmp_path / "prep_typo.yaml"
    bad.write_text("input: [a.txt]\noutput: out\nmax_seq_length: 128\n")
    with pytest.raises(ConfigError, match=r"prep_typo.yaml.*max_seq_length.*max_seq_len"):
        config_from_mapping(config_class(bad), read_mapping(bad), str(bad))


def test_a_group_set_in_yaml_keeps_the_stage_defaults_of_the_rest():
    # Fine-tuning's loop defaults (batch 16, lr 5e-5) are not pretraining's (32, 1e-4).
    base = {"base": "models:/bert@champion", "train": "train.csv"}
    nested = config_from_mapping(FinetuneConfig, {**base, "loop": {"lr": 3e-5}})
    flat = config_from_mapping(FinetuneConfig, {**base, "lr": 3e-5})
    assert nested == flat
    assert (nested.loop.lr, nested.loop.batch_size, nested.loop.eval_every) == (3e-5, 16, 0)
    assert config_from_mapping(PretrainConfig, {}).loop.batch_size == 32


def test_a_misspelt_key_in_a_group_is_rejected_naming_the_group(tmp_path):
    with pytest.raises(ConfigError, match=r"f.yaml: loop.*'learning_rate'.*Valid keys.*lr"):
        config_from_mapping(PretrainConfig, {"loop": {"learning_rate": 1e-3}}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml.*'learning_rate'.*Valid keys.*lr"):
        config_from_mapping(PretrainConfig, {"learning_rate": 1e-3}, "f.yaml")
