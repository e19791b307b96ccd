"""PrepConfig, its YAML files and the `bertflow prep` command line (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bert_core.config_io import ConfigError, load
from data_prep.config import PrepConfig
from workflows.cli import main as cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("prep*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_prep_yaml_files_load(path):
    cfg = load(PrepConfig, path, {"input": ["corpus/"], "output": "out", "vocab": "vocab.txt"})
    cfg.validate_for_run()


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="masked_lm_prob"):
        PrepConfig(masked_lm_prob=1.5)
    with pytest.raises(ConfigError, match="vocab.*not both"):
        PrepConfig(vocab="v.txt", train_vocab=1000)
    bad = tmp_path / "p.yaml"
    bad.write_text("objective: nsp\nmax_seq_length: 128\n")
    with pytest.raises(ConfigError, match="max_seq_length.*Valid keys"):
        load(PrepConfig, bad)
    with pytest.raises(ConfigError, match="--vocab"):
        PrepConfig(input=["x"], output="o").validate_for_run()


def test_cli_missing_input_fails_before_any_work(tmp_path, capsys, minilm_dir):
    out = tmp_path / "ds"
    rc = cli(["prep", "--input", str(tmp_path / "missing.txt"), str(tmp_path / "*.jsonl"),
              "--output", str(out), "--vocab", str(minilm_dir / "vocab.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.txt" in err and "glob matches no file" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_rerun_of_a_folder_without_manifest(tmp_path, capsys):
    rc = cli(["prep", "rerun", str(tmp_path)])
    assert rc == 2 and "no manifest" in capsys.readouterr().err


def test_cli_flags_and_yaml_merge(tmp_path):
    from workflows.cli.args import config_from_args
    from workflows.cli.commands.prep import build_parser

    y = tmp_path / "p.yaml"
    y.write_text("objective: sop\nmax_seq_len: 256\n")
    args = build_parser().parse_args(["--config", str(y), "--input", "a", "b", "--output", "o",
                                       "--max-seq-len", "64", "--no-lowercase",
                                       "--whole-word-mask"])
    cfg = config_from_args(PrepConfig, args)
    assert (cfg.objective, cfg.max_seq_len, cfg.lowercase, cfg.whole_word_mask, cfg.input) == (
        "sop", 64, False, True, ["a", "b"])
