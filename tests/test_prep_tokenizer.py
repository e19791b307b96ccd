"""WordPieceTokenizer gives the same ids as transformers' BertTokenizerFast on real vocabs."""

from __future__ import annotations

import json

import pytest

from data_prep.tokenizer import TokenizerError, WordPieceTokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Unaffable naïveté: Café Müller's résumé costs $3.50!",
    "我爱北京天安门，今天天气很好。",
    "Mixed 中文 and English, with ümlauts and ÅNGSTRÖM units.",
    "tabs\tand\u00a0nbsp and control\x07 chars",
    "a" * 120 + " short",          # a word over 100 chars becomes [UNK]
    "",
]


@pytest.fixture(scope="module")
def hf_tok(minilm_dir):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(minilm_dir / "vocab.txt"), do_lower_case=True)


def test_ids_match_transformers_on_minilm_vocab(minilm_dir, hf_tok):
    tok = WordPieceTokenizer.from_dir(minilm_dir)
    ours = tok.encode_batch(SENTENCES)
    theirs = [hf_tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert ours == theirs
    # Chinese comes out one token per character, as BERT does it
    # (MiniLM's vocab lacks 爱, which becomes [UNK] on its own, not with its neighbours)
    assert tok.tokenize("我爱北京") == ["我", "[UNK]", "北", "京"]
    assert "[UNK]" in tok.tokenize("a" * 120)


def test_cased_tokenizer_keeps_case_and_accents(minilm_dir):
    from transformers import BertTokenizerFast

    text = ["Café MÜLLER"]
    tok = WordPieceTokenizer.from_vocab(minilm_dir / "vocab.txt", lowercase=False)
    hf = BertTokenizerFast(vocab=str(minilm_dir / "vocab.txt"), do_lower_case=False)
    assert tok.encode_batch(text) == [hf(text[0], add_special_tokens=False)["input_ids"]]
    assert tok.fingerprint() != WordPieceTokenizer.from_vocab(minilm_dir / "vocab.txt").fingerprint()


def test_special_ids_and_offsets(minilm_dir, hf_tok):
    tok = WordPieceTokenizer.from_dir(minilm_dir)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.unk_id) == (
        hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id,
        hf_tok.pad_token_id, hf_tok.unk_token_id)
    assert tok.vocab_size == 30522
    text = "Hello wonderful 北京"
    (ids, offsets), = tok.encode_with_offsets([text])
    pieces = tok.convert_ids_to_tokens(ids)
    for piece, (a, b) in zip(pieces, offsets):
        assert text[a:b].lower() == piece.removeprefix("##")


def test_save_roundtrip_loads_in_transformers(tmp_path, minilm_dir):
    from transformers import BertTokenizerFast

    tok = WordPieceTokenizer.from_vocab(minilm_dir / "vocab.txt", lowercase=True)
    tok.save(tmp_path / "tok")
    again = WordPieceTokenizer.from_dir(tmp_path / "tok")
    assert again.fingerprint() == tok.fingerprint()
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["do_lower_case"] is True
    hf = BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf("Café", add_special_tokens=False)["input_ids"] == tok.encode_batch(["Café"])[0]


def test_train_vocab_on_small_corpus(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log", "cats and dogs"] * 50
    tok = WordPieceTokenizer.train(texts, vocab_size=120, lowercase=True)
    assert tok.vocab_size <= 120
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tok.encode_batch(["The cat sat"])[0]
    assert ids and tok.unk_id not in ids


def test_bad_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        WordPieceTokenizer.from_vocab(tmp_path / "nope.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(TokenizerError, match=r"\[CLS\]"):
        WordPieceTokenizer.from_vocab(bad)


def test_vocab_ids_are_line_numbers_like_transformers(tmp_path, minilm_dir):
    """A repeated token and a blank line keep their lines: every later id is unshifted,
    exactly as transformers numbers the same file."""
    from transformers import BertTokenizerFast
    from transformers.models.bert.tokenization_bert import load_vocab

    original = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    lines = list(original)
    lines.insert(2000, lines[1996])  # "the" again: transformers keeps the later line's id
    lines.insert(3000, "")           # a blank line
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in lines), encoding="utf-8")

    tok = WordPieceTokenizer.from_vocab(path)
    hf_vocab = load_vocab(str(path))  # transformers' own vocab.txt reader
    hf = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    assert tok.vocab == dict(hf_vocab) and tok.vocab_size == len(lines)
    assert tok.vocab["the"] == 2000 and tok.vocab["zoo"] == original.index("zoo") + 2
    for s in SENTENCES:
        assert tok.encode_batch([s])[0] == hf(s, add_special_tokens=False)["input_ids"]
    # a saved copy keeps every id in place
    again = WordPieceTokenizer.from_dir(tok.save(tmp_path / "saved"))
    assert again.encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)
    assert again.vocab_size == tok.vocab_size


def test_driver_tokenizing_processes_write_what_its_threads_write(tmp_path, minilm_dir):
    """Pass 1 in the driver on a pool of spawned processes (the tokenizer pickled as its
    settings, one thread each) gives the same units and token files as on this process's
    threads; a unit that fails in a process fails the pass with its own error."""
    import hashlib
    import pickle

    from data_prep import PrepConfig
    from data_prep.manifest import fingerprint_file
    from data_prep.pipeline import stage_units

    tok = WordPieceTokenizer.from_dir(minilm_dir)
    assert pickle.loads(pickle.dumps(tok)).encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("\n".join(f"Doc {d} line {i}: Café Müller's {d * i} rivers."
                                            for i in range(3 + d % 4)) for d in range(60)))
    files, inputs = [str(corpus)], [fingerprint_file(corpus)]
    built = {}
    for workers in (1, 2):
        staging = tmp_path / f"staging{workers}"
        staging.mkdir()
        cfg = PrepConfig(input=files, output=str(tmp_path / "out"), vocab=str(minilm_dir),
                         docs_per_unit=10, tokenize_workers=workers, val_fraction=0.1)
        units, _ = stage_units(files, inputs, cfg, staging, tok)
        built[workers] = (
            [{k: v for k, v in u["tokenized"].items() if k not in ("seconds", "tokens_path")}
             for u in units],
            {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in staging.iterdir()})
    assert len(built[1][0]) >= 6 and built[1] == built[2]
    (tmp_path / "a-file").write_text("")  # staging under a file: every token file fails
    with pytest.raises(OSError):
        stage_units(files, inputs, cfg, tmp_path / "a-file" / "staging", tok)
    from data_prep.processes import PrepProcesses

    with PrepProcesses(2, tok) as pool:
        failed = pool.tokenize([["A sentence."]], 0, str(tmp_path / "a-file" / "staging"))
        with pytest.raises(OSError):  # the process's own error, brought back
            PrepProcesses.result(failed)
