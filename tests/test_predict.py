"""Shared inference without Ray: embeddings (checked against transformers), QA decoding
rules, long inputs, and the model-folder contract (bertflow.json)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workflows.decoding import decode_answer, window_candidates
from workflows.model_folder import write_task_meta
from workflows.serving.predictor import PredictError, Predictor

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply in Tokyo today.", "hi"]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Predictor.from_dir(minilm_dir, device="cpu")


def test_embeddings_match_transformers_for_each_pooling_and_layer(minilm, minilm_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(**enc, output_hidden_states=True)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    layer2_mean = (out.hidden_states[2] * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(minilm.embed(TEXTS, "cls"), out.last_hidden_state[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(minilm.embed(TEXTS, "pooler"), out.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(minilm.embed(TEXTS, "mean", layer=2), layer2_mean.numpy(), atol=1e-4)
    with pytest.raises(PredictError, match="out of range"):
        minilm.embed(TEXTS, "mean", layer=7)


def test_prediction_columns_keep_their_names_beside_clashing_input_columns(minilm):
    from workflows.serving.batch import BatchPredictor

    batch = BatchPredictor.__new__(BatchPredictor)  # what each Ray Data actor holds
    batch.predictor, batch.columns = minilm, {}
    df = pd.DataFrame({"text": ["a good day", "rain"], "embedding": ["gold", "x"],
                       "error": ["old", None]})
    joined = batch(df)
    assert list(joined.columns) == ["text", "input_embedding", "input_error", "embedding",
                                    "error"]
    assert joined["input_embedding"].tolist() == ["gold", "x"]
    assert len(joined["embedding"][0]) == 384 and joined["error"].tolist() == [None, None]


def test_predict_reads_the_text_column_the_user_names(minilm):
    """--text-column review: the model reads `review`; the output keeps the input's names."""
    from workflows.serving.batch import BatchPredictor

    batch = BatchPredictor.__new__(BatchPredictor)
    batch.predictor, batch.columns = minilm, {"text": "review"}
    joined = batch(pd.DataFrame({"review": ["a good day", "rain"]}))
    assert list(joined.columns) == ["review", "embedding", "error"]
    assert joined["error"].tolist() == [None, None]
    batch.columns = {"text": "body"}
    with pytest.raises(PredictError, match="no column 'body'"):
        batch(pd.DataFrame({"review": ["x"]}))


def test_model_without_task_predicts_embeddings(minilm):
    out = minilm.predict(pd.DataFrame({"text": ["a good day", None]}))
    assert len(out["embedding"][0]) == 384
    assert out["error"].tolist() == [None, "missing field 'text'"]
    with pytest.raises(PredictError, match="needs column"):
        minilm.predict(pd.DataFrame({"sentence": ["x"]}))


def test_qa_decoding_prefers_best_span_and_null_by_threshold():
    # window of 6 positions: [CLS] q [SEP] c c [SEP]; context pieces at 3 and 4.
    starts, ends = np.array([5.0, 0, 0, 1, 3, 0]), np.array([5.0, 0, 0, 0, 4, 0])
    o_s, o_e = np.array([-1, -1, -1, 0, 5, -1]), np.array([-1, -1, -1, 4, 9, -1])
    cands, null = window_candidates(starts, ends, o_s, o_e, n_best=5, max_answer_length=5)
    assert cands[0] == (7.0, 5, 9) and null == 10.0
    context = "Anna Oslo"
    assert decode_answer([(cands, null)], context, allow_null=False, null_score_threshold=0,
                         n_best=5)["answer"] == "Oslo"
    assert decode_answer([(cands, null)], context, allow_null=True, null_score_threshold=0,
                         n_best=5)["answer"] == ""
    assert decode_answer([(cands, null)], context, allow_null=True, null_score_threshold=5,
                         n_best=5)["answer"] == "Oslo"
    # max_answer_length 1 forbids the (3, 4) span: only single pieces remain.
    short, _ = window_candidates(starts, ends, o_s, o_e, n_best=5, max_answer_length=1)
    assert all(e - s <= 4 for _, s, e in short)


def test_token_tagging_covers_sentences_longer_than_the_window(minilm_dir, tmp_path):
    import shutil

    import bert_core

    folder = tmp_path / "ner"
    model = bert_core.BertForTokenClassification.from_pretrained(
        minilm_dir, id2label={0: "O", 1: "B-PER", 2: "I-PER"}, num_labels=3)
    model.save_pretrained(folder)
    shutil.copy(minilm_dir / "vocab.txt", folder / "vocab.txt")
    write_task_meta(folder, {"task": "token-cls", "labels": ["O", "B-PER", "I-PER"],
                             "max_seq_len": 16})
    p = Predictor.from_dir(folder, device="cpu")
    words = [f"word{i}" for i in range(40)]  # far more pieces than 16
    tags = p.predict(pd.DataFrame({"tokens": [words, "two words"]}))["tags"].tolist()
    assert len(tags[0]) == 40 and len(tags[1]) == 2
    assert set(tags[0]) <= {"O", "B-PER", "I-PER"}
