"""bert_core on its own: configs, learning, freezing, padding, safe loading, light imports."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

import bert_core
from bert_core import BertConfig, ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> BertConfig:
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32)
    return BertConfig(**{**base, **kw})


# --- configuration ---------------------------------------------------------------------

def test_presets_have_the_documented_shapes():
    base = BertConfig.preset("base")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads,
            base.intermediate_size) == (12, 768, 12, 3072)
    large = BertConfig.preset("large", vocab_size=8000)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads,
            large.vocab_size) == (24, 1024, 16, 8000)
    mini = BertConfig.preset("mini")
    assert (mini.num_hidden_layers, mini.hidden_size) == (4, 256)
    tiny = BertConfig.preset("tiny")
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads) == (2, 128, 2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(pad_token_id=60), "pad_token_id"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels"),
    (dict(id2label={0: "a", 2: "b"}), "id2label"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(**kwargs)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="tiny, mini, base, large"):
        BertConfig.preset("huge")


def test_hf_config_bookkeeping_ignored_and_unsupported_settings_refused(minilm_dir):
    data = json.loads((minilm_dir / "config.json").read_text())
    cfg = BertConfig.from_hf_dict(data)  # carries architectures, use_cache, _name_or_path...
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    with pytest.raises(ConfigError, match="position_embedding_type.*relative_key"):
        BertConfig.from_hf_dict({**data, "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="model_type is 'roberta'"):
        BertConfig.from_hf_dict({**data, "model_type": "roberta"})


def test_labels_survive_json_and_replace():
    cfg = _cfg(id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    assert cfg.num_labels == 3 and cfg.label2id["B-PER"] == 1
    back = BertConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg  # JSON turned label indices into strings; they come back as ints
    assert cfg.replace(num_labels=1).id2label == {0: "LABEL_0"}


# --- the model -------------------------------------------------------------------------

def test_padding_does_not_change_real_token_outputs():
    """A sentence gives the same vectors alone or padded inside a longer batch."""
    torch.manual_seed(0)
    model = bert_core.BertModel(_cfg()).eval()
    short = torch.tensor([[2, 7, 9, 11, 3]])
    batch = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0], [2, 5, 6, 7, 8, 9, 10, 3]])
    mask = (batch != 0).long()
    with torch.no_grad():
        alone = model(short)
        both = model(batch, mask, output_hidden_states=True)
    torch.testing.assert_close(both.last_hidden_state[0, :5], alone.last_hidden_state[0])
    torch.testing.assert_close(both.pooler_output[0], alone.pooler_output[0])
    assert len(both.hidden_states) == 3 and both.hidden_states[0].shape == (2, 8, 32)
    assert both.last_hidden_state[0, 5:].abs().sum() == 0  # pads are zero, not noise


def test_too_long_input_is_a_clear_error():
    model = bert_core.BertModel(_cfg())
    with pytest.raises(bert_core.BertflowError, match="max_position_embeddings=32"):
        model(torch.ones(1, 40, dtype=torch.long))


def test_init_is_berts():
    model = bert_core.BertForPreTraining(_cfg(initializer_range=0.02))
    emb = model.bert.embeddings.word_embeddings.weight
    assert abs(emb[1:].std().item() - 0.02) < 0.005 and emb[0].abs().sum() == 0  # [PAD] row
    assert torch.all(model.bert.layers[0].attn_norm.weight == 1)
    assert torch.all(model.bert.layers[0].qkv.bias == 0) and torch.all(model.mlm.bias == 0)


def _pretraining_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    mask[3, 6:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(4, 12, generator=g) < 0.3) & mask.bool()
    labels[pick] = ids[pick]
    ids = ids.masked_fill(pick, 4)  # [MASK]
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0, 1]))


def test_tiny_model_overfits_mlm_and_nsp():
    torch.manual_seed(0)
    model = bert_core.BertForPreTraining(_cfg(hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0))
    batch = _pretraining_batch(50)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(**batch)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    out = model(**batch)
    assert first > 3.0 and out.loss.item() < 0.05, (first, out.loss.item())
    assert out.mlm_count.item() == int((batch["labels"] != -100).sum())
    assert out.mlm_correct.item() == out.mlm_count.item() and out.nsp_correct.item() == 4
    # the decoder ran on the masked positions only
    assert out.prediction_logits.shape == (out.mlm_count.item(), 50)


def test_pretraining_without_labels_gives_full_logits_and_no_loss():
    model = bert_core.BertForPreTraining(_cfg()).eval()
    batch = _pretraining_batch(50)
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert out.loss is None and out.prediction_logits.shape == (4, 12, 50)
    assert out.seq_relationship_logits.shape == (4, 2)
    no_masked = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)})
    assert torch.isfinite(no_masked.loss) and no_masked.mlm_count.item() == 0


def test_freeze_encoder_trains_only_the_head():
    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification(_cfg(num_labels=3))
    model.freeze_encoder()
    assert model.num_parameters(trainable_only=True) == 32 * 3 + 3
    encoder_before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    head_before = model.classifier.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 50, (4, 10))
    for _ in range(3):
        loss = model(ids, labels=torch.tensor([0, 1, 2, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert not torch.equal(model.classifier.weight, head_before)


def test_qa_span_never_points_into_padding():
    torch.manual_seed(0)
    model = bert_core.BertForQuestionAnswering(_cfg()).eval()
    with torch.no_grad():
        model.qa_outputs.bias.fill_(100.0)  # pads (zero vectors) would otherwise win
        ids = torch.tensor([[2, 7, 8, 3, 0, 0]])
        out = model(ids, (ids != 0).long())
    assert out.start_logits.argmax(-1).item() < 4 and out.end_logits.argmax(-1).item() < 4


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = bert_core.BertForTokenClassification(_cfg(id2label={0: "O", 1: "B", 2: "I"})).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    again = bert_core.BertForTokenClassification.from_pretrained(tmp_path / "m").eval()
    assert again.config == model.config and again.loading_info["missing_keys"] == []
    ids = torch.randint(5, 50, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    # a new head over the same encoder: fewer labels, head newly initialised
    seq = bert_core.BertForSequenceClassification.from_pretrained(tmp_path / "m", num_labels=2)
    assert seq.loading_info["missing_keys"] == ["bert.pooler.dense.bias",
                                                "bert.pooler.dense.weight",
                                                "classifier.bias", "classifier.weight"]


def test_pickled_weights_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_cfg().to_hf_dict()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(bert_core.BertflowError, match="pytorch_model.bin.*save_pretrained"):
        bert_core.BertModel.from_pretrained(folder)
    assert not marker.exists()


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(bert_core.BertflowError, match="model folder not found"):
        bert_core.BertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(bert_core.BertflowError, match="config.json"):
        bert_core.BertModel.from_pretrained(tmp_path / "empty")


def test_import_pulls_in_neither_ray_mlflow_nor_transformers():
    code = ("import sys, bert_core; from bert_core import BertModel, BertForPreTraining, "
            "BertConfig; bad = [m for m in ('ray', 'mlflow', 'transformers') if m in "
            "sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sharded_safetensors_folder_loads(tmp_path):
    """Large checkpoints come as shards plus model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = bert_core.BertModel(_cfg()).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(tmp_path / shard))
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    again = bert_core.BertModel.from_pretrained(tmp_path, strict=True).eval()
    ids = torch.randint(5, 50, (2, 7))
    torch.testing.assert_close(again(ids).last_hidden_state, model(ids).last_hidden_state)
