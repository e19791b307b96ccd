"""Hostile or broken model folders (issue 12): refused with an error naming the file and
field, before any memory is allocated for them, and never served with random weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import bert_core
from bert_core import BertConfig
from bert_core.config_io import BertflowError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny(tmp_path, name="m", cls=bert_core.BertModel, vocab=64, **overrides):
    folder = tmp_path / name
    config = BertConfig.preset("tiny", vocab_size=vocab, **overrides)
    cls(config).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _load_under_memory_cap(folder) -> subprocess.CompletedProcess:
    """from_pretrained in a child limited to 4 GiB of address space: the old code's
    allocation fails (or is killed) there instead of taking the machine down."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        import bert_core
        try:
            bert_core.BertModel.from_pretrained({str(folder)!r})
        except bert_core.BertflowError as exc:
            print("REFUSED:", exc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("field,value,needle", [
    ("vocab_size", 1e12, "vocab_size"),
    ("num_hidden_layers", 1e6, "num_hidden_layers"),
    ("vocab_size", 4_000_000, "vocab_size=4000000"),      # under the bound: the header decides
    ("num_hidden_layers", 200, "num_hidden_layers=200"),
    ("num_labels", 1_000_000_000, "num_labels"),               # a billion label names
])
def test_hostile_sizes_are_refused_before_allocating(tmp_path, field, value, needle):
    folder = _tiny(tmp_path)
    _edit_config(folder, **{field: value})
    if field == "num_labels":
        _edit_config(folder, id2label=None, label2id=None)
    run = _load_under_memory_cap(folder)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED:" in run.stdout and needle in run.stdout and "config.json" in run.stdout


def test_config_shapes_are_checked_against_the_header(tmp_path):
    folder = _tiny(tmp_path)
    _edit_config(folder, intermediate_size=1024)
    with pytest.raises(BertflowError, match=r"intermediate_size=1024.*\(512, 128\)"):
        bert_core.BertModel.from_pretrained(folder)
    _edit_config(folder, intermediate_size=512, max_position_embeddings=1024)
    with pytest.raises(BertflowError, match="max_position_embeddings=1024"):
        bert_core.BertModel.from_pretrained(folder)


@pytest.mark.parametrize("payload", [
    b'{"vocab_size": 64, "hidden_act": "g\xe9lu"}', b'{"vocab_size": 1' + b"0" * 5000 + b"}",
    b"[" * 100_000, b'{"label2id": {"a": "x"}}', b'{"id2label": {"0": "a"}, "num_labels": 1e20}',
])
def test_unreadable_or_absurd_config_json_is_a_clear_error(tmp_path, payload):
    folder = _tiny(tmp_path)
    (folder / "config.json").write_bytes(payload)
    with pytest.raises(BertflowError, match="config.json"):
        bert_core.BertModel.from_pretrained(folder)


def test_shard_names_must_stay_in_the_folder(tmp_path):
    outside = _tiny(tmp_path, "outside")
    folder = _tiny(tmp_path, "m")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight":
                                            "../outside/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BertflowError, match="not a plain .safetensors file name"):
        bert_core.BertModel.from_pretrained(folder)
    index["weight_map"] = {"x": str(outside / "model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BertflowError, match="refusing to read outside"):
        bert_core.BertModel.from_pretrained(folder)


def _model_folder(tmp_path, vocab_lines: int, with_head: bool):
    from workflows.model_folder import write_task_meta

    cls = bert_core.BertForSequenceClassification if with_head else bert_core.BertModel
    folder = _tiny(tmp_path, "clf", cls=cls)
    tokens = SPECIALS + [f"w{i}" for i in range(vocab_lines - len(SPECIALS))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    write_task_meta(folder, {"task": "seq-cls", "labels": ["LABEL_0", "LABEL_1"],
                             "max_seq_len": 16})
    return folder


def test_prediction_refuses_a_classifier_folder_without_its_head(tmp_path):
    from workflows.serving.predictor import Predictor

    folder = _model_folder(tmp_path, 64, with_head=False)
    with pytest.raises(BertflowError, match="classifier.weight"):
        Predictor.from_dir(folder, device="cpu")


def test_a_vocab_larger_than_the_model_is_refused_at_load(tmp_path):
    from bert_core.hf_compat import check_tokenizer_fits
    from workflows.serving.predictor import Predictor

    folder = _model_folder(tmp_path, 80, with_head=True)
    with pytest.raises(BertflowError, match=r"vocab.txt: has 80 tokens .* vocab_size 64"):
        Predictor.from_dir(folder, device="cpu")
    check_tokenizer_fits(folder, 80)  # fits: no error
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + ["a"] * 59))  # no final newline
    Predictor.from_dir(folder, device="cpu")
