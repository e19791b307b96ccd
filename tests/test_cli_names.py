"""One concept, one flag: renamed options keep their old spelling for one release, each
use announced by one `deprecated:` line; the new names reach the same config fields."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from bert_core import config_io
from workflows.cli import verb_module
from workflows.cli.args import config_from_args
from workflows.config import FinetuneConfig, JobsConfig, SubmitConfig, SweepConfig, config_from_mapping

FT = ["--base", "b", "--train", "t.csv"]


def _prep_config():
    from data_prep.config import PrepConfig

    return PrepConfig


# verb argv with an old spelling -> (config class, field, value it must set, new spelling)
OLD_SPELLINGS = [
    (["prep", "--input", "x", "--output", "o", "--num-workers", "3"],
     _prep_config, "tokenize_workers", 3, "--tokenize-workers"),
    (["prep", "--input", "x", "--output", "o", "--text-field", "body"],
     _prep_config, "text_column", "body", "--text-column"),
    (["finetune", *FT, "--max-answer-length", "12"],
     lambda: FinetuneConfig, "max_answer_len", 12, "--max-answer-len"),
    (["finetune", *FT, "--pooling", "cls"],
     lambda: FinetuneConfig, "pooling", "pooler", "--pooling pooler"),
    (["sweep", *FT, "--eval", "e.csv", "--max-answer-length", "7"],
     lambda: SweepConfig, "max_answer_len", 7, "--max-answer-len"),
    (["jobs", "list", "--address", "http://127.0.0.1:8265"],
     lambda: JobsConfig, "dashboard_url", "http://127.0.0.1:8265", "--dashboard-url"),
    (["submit", "prep", "--address", "http://127.0.0.1:8265"],
     lambda: SubmitConfig, "dashboard_url", "http://127.0.0.1:8265", "--dashboard-url"),
]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(config_io, "_warned", set())


@pytest.mark.parametrize("argv,cls,name,value,new", OLD_SPELLINGS,
                         ids=[" ".join(a[:1] + [x for x in a if x.startswith("--")][-1:])
                              for a, *_ in OLD_SPELLINGS])
def test_an_old_spelling_still_works_and_says_its_new_name(argv, cls, name, value, new, caplog):
    parser = verb_module(argv[0]).build_parser()
    with caplog.at_level(logging.WARNING, logger="bertflow.config"):
        if argv[0] == "submit":
            args, _ = parser.parse_known_args(argv[1:])
        else:
            args = parser.parse_args(argv[1:])
        cfg = config_from_args(cls(), args)
    assert getattr(cfg, name) == value
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(lines) == 1 and new in lines[0], lines
    # the new spelling: the same value, no deprecation line
    caplog.clear()
    new_argv = [new.split()[0] if a == [x for x in argv if x.startswith("--")][-1] else a
                for a in argv]
    args = (parser.parse_known_args(new_argv[1:])[0] if argv[0] == "submit"
            else parser.parse_args(new_argv[1:]))
    assert getattr(config_from_args(cls(), args), name) == value
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_prep_rerun_keeps_its_old_worker_flag():
    parser = verb_module("prep").build_parser()
    assert parser.parse_args(["rerun", "d", "--num-workers", "2"]).tokenize_workers == 2
    assert parser.parse_args(["rerun", "d", "--tokenize-workers", "2"]).tokenize_workers == 2
    assert parser.parse_args(["rerun", "d"]).tokenize_workers is None


def test_old_yaml_keys_and_values_still_load(caplog):
    with caplog.at_level(logging.WARNING, logger="bertflow.config"):
        cfg = config_from_mapping(FinetuneConfig, {"base": "b", "train": "t",
                                                   "max_answer_length": 9, "pooling": "cls"},
                                  "old.yaml")
    assert (cfg.max_answer_len, cfg.pooling, cfg.classifier_pooling) == (9, "pooler", "cls")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "old.yaml" in text and "max_answer_len" in text and "'pooler'" in text
    from data_prep.config import PrepConfig

    prep = config_io.from_dict(PrepConfig, {"num_workers": 2, "text_field": "body"}, "m.json")
    assert (prep.tokenize_workers, prep.text_column) == (2, "body")
    with pytest.raises(config_io.ConfigError, match="unknown key"):
        config_from_mapping(FinetuneConfig, {"base": "b", "train": "t", "max_answer": 9})


def test_a_renamed_field_keeps_the_prep_fingerprint_of_existing_datasets():
    """A dataset built before --text-field became --text-column must not turn STALE."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import _key_config

    key = _key_config(PrepConfig(input=["x"], output="o", vocab="v", text_column="body"))
    assert key["text_field"] == "body" and "text_column" not in key
    assert "tokenize_workers" not in key  # runtime only


def test_the_deprecation_line_reaches_the_terminal(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "prep", "--input", str(tmp_path / "none"),
         "--output", str(tmp_path / "o"), "--vocab", str(tmp_path / "v.txt"),
         "--num-workers", "1"],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "BERTFLOW_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "deprecated: --num-workers is now --tokenize-workers" in proc.stderr


def test_pooling_names_mean_the_same_in_finetune_and_embed():
    """`pooler` is BERT's tanh pooler and `cls` the raw [CLS] vector wherever they appear."""
    from workflows.config import EmbedConfig

    finetune = verb_module("finetune").build_parser().parse_args([*FT, "--pooling", "pooler"])
    assert config_from_args(FinetuneConfig, finetune).classifier_pooling == "cls"  # bert_core's
    embed_choices = {a.dest: a.choices for a in verb_module("embed").build_parser()._actions}
    assert {"cls", "mean", "pooler"} <= set(embed_choices["pooling"])
    ft_choices = {a.dest: a.choices for a in verb_module("finetune").build_parser()._actions}
    assert "cls" not in ft_choices["pooling"] and "pooler" in ft_choices["pooling"]
    assert EmbedConfig(model="m", input="i", output="o.parquet", use_gpu=True).use_gpu


def test_columns_of_a_task_file_are_flags_of_every_verb_that_reads_one():
    for verb, extra in (("finetune", FT), ("sweep", [*FT, "--eval", "e"]),
                        ("predict", ["--model", "m", "--input", "i", "--output", "o.csv"]),
                        ("embed", ["--model", "m", "--input", "i", "--output", "o.parquet"]),
                        ("prep", ["--input", "i", "--output", "o"])):
        args = verb_module(verb).build_parser().parse_args([*extra, "--text-column", "body"])
        assert args.text_column == "body", verb
    cfg = config_from_args(FinetuneConfig, verb_module("finetune").build_parser().parse_args(
        [*FT, "--task", "pair-cls", "--text-pair-column", "hyp", "--label-column", "gold"]))
    assert cfg.columns == {"text_a": "text_a", "text_b": "hyp", "label": "gold"}


def test_every_boolean_option_states_its_default():
    import argparse

    for verb in ("prep", "pretrain", "finetune", "predict", "embed", "server"):
        for action in verb_module(verb).build_parser()._actions:
            if isinstance(action, argparse.BooleanOptionalAction) and action.help != \
                    argparse.SUPPRESS and action.dest != "normalize":
                assert "(default: o" in action.help, (verb, action.dest, action.help)
