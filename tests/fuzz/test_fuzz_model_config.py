"""Property tests over `from_pretrained` config loading: any config.json (odd JSON, huge
or wrong-typed values, random bytes, truncations, other encodings) and any safetensors
index either loads a model of the size the weights hold or raises a BertflowError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bert_core
from bert_core import BertConfig
from bert_core.config_io import BertflowError

settings.load_profile("bertflow-fuzz")
FEWER = settings(max_examples=100)  # each example builds a model
pytestmark = pytest.mark.timeout(90)

FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
          "layer_norm_eps", "pad_token_id", "hidden_dropout_prob", "initializer_range",
          "num_labels", "id2label", "label2id", "model_type", "position_embedding_type",
          "is_decoder", "classifier_dropout", "problem_type", "tie_word_embeddings"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.sampled_from([0, -1, 1, 2, 64, 128, 1e12, 10**30, 2**63, "128", "gelu", "bert",
                              "absolute", "NaN"]) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-model") / "m"
    bert_core.BertModel(BertConfig.preset("tiny", vocab_size=64)).save_pretrained(folder)
    return folder


def load(folder):
    try:
        model = bert_core.BertModel.from_pretrained(folder)
    except BertflowError:
        return "refused"
    n = model.num_parameters()
    assert n < 2_000_000, n  # never larger than the weights on disk (tiny: ~0.5M)
    return "loaded"


@FEWER
@given(changes=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=4))
def test_config_fields_with_any_json_values(folder, tried, changes):
    original = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**original, **changes}))
    try:
        tried("config.json fields", load(folder))
    finally:
        (folder / "config.json").write_text(json.dumps(original))


@FEWER
@given(data=st.binary(max_size=600) | JSON.map(lambda v: json.dumps(v).encode()),
       how=st.sampled_from(["as is", "cut", "utf-16", "latin-1 + bad byte"]),
       cut=st.integers(0, 600))
def test_config_bytes_truncations_and_encodings(folder, tried, data, how, cut):
    original = (folder / "config.json").read_bytes()
    if how == "cut":
        data = original[:cut % (len(original) + 1)]
    elif how == "utf-16":
        data = original.decode().encode("utf-16")
    elif how == "latin-1 + bad byte":
        data = original.replace(b'"gelu"', b'"g\xe9lu"')
    (folder / "config.json").write_bytes(data)
    try:
        tried("config.json bytes", load(folder))
    finally:
        (folder / "config.json").write_bytes(original)


@FEWER
@given(index=JSON | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=8), st.sampled_from(["model-1.safetensors", "../m/model.safetensors",
                                         "/etc/passwd", "", ".", "sub/x.safetensors"])
    | JSON, max_size=3)}))
def test_safetensors_index_any_content(folder, tried, index):
    weights = folder / "model.safetensors"
    hidden = folder / "model-1.safetensors"
    weights.rename(hidden)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        tried("safetensors index", load(folder))
    finally:
        hidden.rename(weights)
        (folder / "model.safetensors.index.json").unlink()
