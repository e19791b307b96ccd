"""`bertflow embed` on a sentence-transformers folder equals SentenceTransformer.encode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bert_core.config_io import BertflowError
from workflows.config import EmbedConfig
from workflows.serving.batch import embed_settings
from workflows.serving.predictor import Predictor
from workflows.serving.st_settings import EmbedSettings, read_embed_settings

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(tokenizer) -> tuple[list[str], list[int]]:
    """Texts of every length: short, 128-256 and over 256 word pieces."""
    texts = ["hello world", SENTENCE, SENTENCE * 8, SENTENCE * 14, SENTENCE * 30]
    return texts, [len(ids) + 2 for ids in tokenizer.encode_batch(texts)]


def test_minilm_folder_settings_are_read(minilm_dir):
    s = read_embed_settings(minilm_dir)
    assert (s.pooling, s.max_seq_len, s.normalize) == ("mean", 256, True)
    assert read_embed_settings(minilm_dir / "1_Pooling") == EmbedSettings()  # no modules.json
    cfg = EmbedConfig(model="m", input="i.csv", output="o.parquet")
    assert embed_settings(cfg, minilm_dir) == ("mean", 256, True)
    flags = EmbedConfig(model="m", input="i.csv", output="o.parquet", pooling="cls",
                        max_seq_len=64, normalize=False)
    assert embed_settings(flags, minilm_dir) == ("cls", 64, False)


def test_embed_equals_sentence_transformers_at_every_length(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    predictor = Predictor.from_dir(minilm_dir, device="cpu")
    texts, lengths = _texts(predictor.tokenizer)
    assert min(lengths) < 128 and any(128 < n <= 256 for n in lengths) and max(lengths) > 256
    pooling, max_len, normalize = embed_settings(
        EmbedConfig(model="m", input="i.csv", output="o.parquet"), minilm_dir)
    ours = predictor.embed(texts, pooling=pooling, max_seq_len=max_len, normalize=normalize)
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() > 0.9999, (cosine, lengths)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # the old behaviour, cut at 128 pieces, is measurably different on long texts
    short = predictor.embed(texts, pooling="mean", max_seq_len=128, normalize=True)
    cut = (short * ref).sum(1)
    assert cut[np.array(lengths) > 140].max() < 0.999


def test_bad_sentence_transformers_settings_name_the_file(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 1, "name": "1", "path": "1_Pooling",
          "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_max_tokens": True}))
    with pytest.raises(BertflowError, match="pooling_mode_max_tokens.*--pooling"):
        read_embed_settings(tmp_path)
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(BertflowError, match="modules.json"):
        read_embed_settings(tmp_path)
