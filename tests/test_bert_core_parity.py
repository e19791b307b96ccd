"""bert_core against transformers: same numbers on real weights, folders load both ways."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bert_core  # noqa: E402
from bert_core import BertConfig  # noqa: E402

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _padded_batch(vocab: int, seed: int = 0, lengths=(20, 13, 6)):
    """input_ids, attention_mask, token_type_ids (B, T) with right padding and two segments."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2:n] = 1
    ids[mask == 0] = 0
    return ids, mask, types


def test_minilm_real_weights_match_transformers(minilm_dir):
    ours = bert_core.BertModel.from_pretrained(minilm_dir).eval()
    assert ours.loading_info == {"missing_keys": [], "unexpected_keys": []}
    ref = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="sdpa").eval()
    ids, mask, types = _padded_batch(30522, lengths=(24, 17, 9, 3))
    with torch.no_grad():
        a = ours(ids, mask, types, output_hidden_states=True)
        b = ref(input_ids=ids, attention_mask=mask, token_type_ids=types,
                output_hidden_states=True)
    real = mask.bool()  # pad positions carry no meaning (ours are zero)
    assert len(a.hidden_states) == len(b.hidden_states) == 7
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real],
                               atol=TOL, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=TOL, rtol=0)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        torch.testing.assert_close(x[real], y[real], atol=TOL, rtol=0, msg=f"hidden state {i}")


def _small(num_labels: int = 2) -> tuple[BertConfig, "transformers.BertConfig"]:
    ours = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    ref = transformers.BertConfig(**ours.to_hf_dict())
    return ours, ref


def _labels_for(name: str, ids, mask, num_labels: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = ids.shape
    if name in ("BertForPreTraining", "BertForMaskedLM"):
        labels = torch.full((B, T), -100)
        pick = (torch.rand(B, T, generator=g) < 0.3) & mask.bool()
        pick[:, 1] = True
        labels[pick] = ids[pick]
        extra = {"next_sentence_label": torch.tensor([0, 1, 1])} \
            if name == "BertForPreTraining" else {}
        return {"labels": labels, **extra}
    if name == "BertForSequenceClassification":
        if num_labels == 1:
            return {"labels": torch.randn(B, generator=g)}
        return {"labels": torch.randint(0, num_labels, (B,), generator=g)}
    if name == "BertForTokenClassification":
        labels = torch.randint(0, num_labels, (B, T), generator=g)
        labels[mask == 0] = -100
        return {"labels": labels}
    # QA: the last example's answer lies past the sequence (truncated): it carries no loss
    return {"start_positions": torch.tensor([2, 3, 50]), "end_positions": torch.tensor([4, 3, 60])}


def _logits(name: str, out) -> list[torch.Tensor]:
    if name == "BertForPreTraining":
        return [out.prediction_logits, out.seq_relationship_logits]
    if name == "BertForQuestionAnswering":
        return [out.start_logits, out.end_logits]
    return [out.logits]


def _compare(name, ours_model, ref_model, num_labels):
    ids, mask, types = _padded_batch(99)
    real = mask.bool()
    with torch.no_grad():
        a = ours_model(ids, mask, types)
        b = ref_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for x, y in zip(_logits(name, a), _logits(name, b)):
            if x.dim() >= 2 and x.shape[:2] == ids.shape:  # per-token: compare real tokens
                x, y = x[real], y[real]
            torch.testing.assert_close(x, y, atol=TOL, rtol=0)
        if name == "BertForQuestionAnswering":
            # transformers lets pad positions into the span softmax (ours mask them), so the
            # losses agree on a batch without padding
            mask = torch.ones_like(mask)
        labels = _labels_for(name, ids, mask, num_labels)
        la = ours_model(ids, mask, types, **labels).loss
        lb = ref_model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels).loss
        torch.testing.assert_close(la, lb, atol=TOL, rtol=0)


HEADS = [("BertModel", 2), ("BertForPreTraining", 2), ("BertForMaskedLM", 2),
         ("BertForSequenceClassification", 3), ("BertForSequenceClassification", 1),
         ("BertForTokenClassification", 5), ("BertForQuestionAnswering", 2)]


@pytest.mark.parametrize("name,num_labels", HEADS)
def test_transformers_folder_loads_with_same_outputs(tmp_path, name, num_labels):
    ours_cfg, ref_cfg = _small(num_labels)
    torch.manual_seed(0)
    ref = getattr(transformers, name)(ref_cfg).eval()
    with torch.no_grad():  # move every weight off its init so a mis-mapped one shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    ours = getattr(bert_core, name).from_pretrained(tmp_path).eval()
    assert ours.loading_info == {"missing_keys": [], "unexpected_keys": []}
    assert ours.config.num_labels == num_labels
    if name == "BertModel":
        _compare_encoder(ours, ref)
    else:
        _compare(name, ours, ref, num_labels)


@pytest.mark.parametrize("name,num_labels", HEADS)
def test_bert_core_folder_loads_in_transformers(tmp_path, name, num_labels):
    ours_cfg, _ = _small(num_labels)
    torch.manual_seed(0)
    ours = getattr(bert_core, name)(ours_cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [name] and saved["model_type"] == "bert"
    ref, info = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    ref.eval()
    if name == "BertModel":
        _compare_encoder(ours, ref)
    else:
        _compare(name, ours, ref, num_labels)


def _compare_encoder(ours, ref):
    ids, mask, types = _padded_batch(99)
    real = mask.bool()
    with torch.no_grad():
        a, b = ours(ids, mask, types), ref(input_ids=ids, attention_mask=mask,
                                           token_type_ids=types)
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real],
                               atol=TOL, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=TOL, rtol=0)


def test_encoder_found_whichever_class_saved_the_folder(tmp_path):
    """An HF BertModel folder (no `bert.` prefix) loads into a head; a pretraining folder
    loads into BertModel; what does not fit is reported by its HF name."""
    _, ref_cfg = _small(3)
    torch.manual_seed(0)
    transformers.BertModel(ref_cfg).save_pretrained(tmp_path / "encoder")
    cls = bert_core.BertForSequenceClassification.from_pretrained(tmp_path / "encoder")
    assert cls.loading_info["missing_keys"] == ["classifier.bias", "classifier.weight"]
    assert cls.loading_info["unexpected_keys"] == []
    ref_enc = transformers.BertModel.from_pretrained(tmp_path / "encoder")
    torch.testing.assert_close(cls.bert.embeddings.word_embeddings.weight,
                               ref_enc.embeddings.word_embeddings.weight)

    transformers.BertForPreTraining(ref_cfg).save_pretrained(tmp_path / "pretrain")
    enc = bert_core.BertModel.from_pretrained(tmp_path / "pretrain")
    assert enc.loading_info["missing_keys"] == []
    assert "cls.seq_relationship.weight" in enc.loading_info["unexpected_keys"]
    with pytest.raises(bert_core.BertflowError, match="cls.seq_relationship.weight"):
        bert_core.BertModel.from_pretrained(tmp_path / "pretrain", strict=True)


def test_config_json_is_what_transformers_reads():
    cfg = BertConfig.preset("mini", vocab_size=1000, id2label={0: "neg", 1: "pos", 2: "mixed"})
    ref = transformers.BertConfig(**json.loads(json.dumps(cfg.to_hf_dict())))
    assert (ref.hidden_size, ref.num_hidden_layers, ref.num_labels) == (256, 4, 3)
    assert ref.id2label[2] == "mixed"
    back = BertConfig.from_hf_dict(json.loads(ref.to_json_string()))
    assert back == cfg
