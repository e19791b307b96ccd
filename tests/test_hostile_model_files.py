"""Hostile or broken model folders: refused with an error naming the file and
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


def _giant_config_tiny_weights(folder):
    """The review's case: a ~214-byte config.json for hidden 32768, 256 layers and an
    intermediate of 131072 (~3e12 parameters), beside a ~54 KB safetensors file that holds
    the one tensor the old shape check required plus a 1-byte tensor per layer (the
    layer-count check only looked at names)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 1,
              "hidden_size": 32768, "num_hidden_layers": 256, "num_attention_heads": 256,
              "intermediate_size": 131072, "pad_token_id": 0, "type_vocab_size": 1}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {"embeddings.word_embeddings.weight": torch.zeros(1, 32768, dtype=torch.uint8)}
    tensors.update({f"encoder.layer.{i}.output.LayerNorm.bias": torch.zeros(1, dtype=torch.uint8)
                    for i in range(256)})
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_giant_config_over_tiny_weights_fails_fast_without_allocating(tmp_path):
    folder = _giant_config_tiny_weights(tmp_path / "giant")
    assert (folder / "config.json").stat().st_size < 300
    assert (folder / "model.safetensors").stat().st_size < 60_000
    run = _load_under_memory_cap(folder)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED:" in run.stdout and str(folder) in run.stdout
    assert "parameters, but the weight files hold" in run.stdout
    # Every class checks the same way.
    for cls in (bert_core.BertForSequenceClassification, bert_core.BertForPreTraining):
        with pytest.raises(BertflowError, match="weight files hold"):
            cls.check_pretrained(folder)


def test_tensors_the_name_check_missed_are_required_before_building(tmp_path):
    """Past the byte count (a file big enough for the parameters), the model is built on
    the meta device and every encoder tensor must be in the file with its shape."""
    import torch
    from safetensors.torch import save_file

    folder = _tiny(tmp_path)
    tensors = {"embeddings.word_embeddings.weight": torch.zeros(64, 128),
               "padding": torch.zeros(600_000, dtype=torch.uint8)}
    tensors.update({f"encoder.layer.{i}.output.LayerNorm.bias": torch.zeros(128)
                    for i in range(2)})
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(BertflowError, match="lack .* encoder tensors that config.json implies"):
        bert_core.BertModel.check_pretrained(folder)


def test_every_encoder_tensor_is_required_with_its_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _tiny(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(BertflowError, match=r"lack 1 encoder tensors.*layer\.1\.output\.dense"):
        bert_core.BertModel.from_pretrained(folder)
    tensors["encoder.layer.1.output.dense.weight"] = tensors[
        "encoder.layer.0.output.dense.weight"][:, :64].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(BertflowError,
                       match=r"layer\.1\.output\.dense\.weight has shape \(128, 64\)"):
        bert_core.BertModel.from_pretrained(folder)


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


def test_a_hostile_folder_fails_on_the_driver_before_any_ray_work(tmp_path, monkeypatch,
                                                                   tracking_uri):
    """`embed --model DIR` with `vocab_size: 1e12` used to start Ray, ship the folder and
    fail in the actor 47 s later, naming the shipped copy. Every verb that takes a model
    folder now checks it on the driver first, naming the user's folder."""
    import data_prep.ray_env
    from workflows.config import EmbedConfig, FinetuneConfig, PredictConfig, config_from_mapping
    from workflows.ops.hf_import import import_hf
    from workflows.serving.batch import embed_file, predict_file
    from workflows.training.finetune import run_finetune

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a folder that cannot load")

    monkeypatch.setattr(data_prep.ray_env, "init_ray", no_ray)
    folder = _model_folder(tmp_path, 64, with_head=True)
    _edit_config(folder, vocab_size=1e12)
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\nhello,LABEL_0\n")
    calls = [
        lambda: embed_file(EmbedConfig(model=str(folder), input=str(texts),
                                       output=str(tmp_path / "v.parquet"))),
        lambda: predict_file(PredictConfig(model=str(folder), input=str(texts),
                                           output=str(tmp_path / "p.csv"))),
        lambda: import_hf(folder, "hostile", tracking_uri),
        lambda: run_finetune(config_from_mapping(FinetuneConfig, dict(
            task="seq-cls", base=str(folder), train=str(texts), tracking_uri=tracking_uri,
            storage_path=str(tmp_path / "runs"), run_name="ft"))),
    ]
    for call in calls:
        with pytest.raises(BertflowError) as err:
            call()
        assert str(folder) in str(err.value) and "vocab_size" in str(err.value)
        assert "bertflow-shipped" not in str(err.value)
