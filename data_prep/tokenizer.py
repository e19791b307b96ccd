"""BERT's WordPiece tokenizer over Hugging Face `tokenizers` (Rust, batch-parallel).

It reproduces Google's BasicTokenizer + WordpieceTokenizer: text cleaning (control
characters dropped, whitespace normalised), every CJK character split into its own token,
optional lowercasing, accents stripped when lowercasing (BERT's rule), punctuation split,
then greedy longest-match WordPiece with `##` continuations and `[UNK]` for words that
cannot be pieced (or are longer than 100 characters).

A tokenizer is fully described by its vocabulary and three settings, which `save(dir)`
writes as `vocab.txt` + `tokenizer_config.json` (the Hugging Face layout, so transformers'
BertTokenizer loads the same folder) and `fingerprint()` hashes. `from_dir` and `save` also
take a URI (`s3://bucket/dataset`): a dataset's tokenizer is read wherever it lives, by
the driver or by any worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bert_core.config_io import BertflowError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TokenizerError(BertflowError):
    """A vocabulary or tokenizer folder is missing or unusable."""


def _read_vocab(path: Path) -> dict[str, int]:
    """token -> id where the id is the line index, as Google's and transformers' loaders do:
    a blank or repeated line still takes its id (a repeated token keeps its last line, as
    `transformers.BertTokenizer` and `tokenizers.WordPiece.from_file` do), so no later id
    shifts."""
    if not path.is_file():
        raise TokenizerError(f"{path}: vocabulary file not found (expected a WordPiece "
                             "vocab.txt with one token per line)")
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            vocab[line.rstrip("\n")] = index
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{path}: vocabulary lacks special token(s) {', '.join(missing)}; "
                             "a BERT vocab.txt must contain [PAD] [UNK] [CLS] [SEP] [MASK]")
    return vocab


class WordPieceTokenizer:
    """BERT WordPiece tokenization: `encode_batch` gives ids without special tokens."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True,
                 strip_accents: bool | None = None, chinese_chars: bool = True) -> None:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        self._vocab = dict(vocab)
        self._lowercase = bool(lowercase)
        # BERT strips accents exactly when it lowercases, unless told otherwise.
        self._strip_accents = self._lowercase if strip_accents is None else bool(strip_accents)
        self._chinese_chars = bool(chinese_chars)
        tok = Tokenizer(models.WordPiece(vocab=self._vocab, unk_token="[UNK]",
                                         max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=self._chinese_chars,
            strip_accents=self._strip_accents, lowercase=self._lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        self._tok = tok
        self._id_to_token = [""] * (max(self._vocab.values()) + 1)
        for token, idx in self._vocab.items():
            self._id_to_token[idx] = token

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pickled as its settings (for the tokenizing processes), rebuilt the same way
        return type(self), (self._vocab, self._lowercase, self._strip_accents,
                            self._chinese_chars)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab_txt: str | Path, lowercase: bool = True,
                   strip_accents: bool | None = None) -> WordPieceTokenizer:
        """Load a Google/HF `vocab.txt` (one token per line, the line number is the id)."""
        return cls(_read_vocab(Path(vocab_txt)), lowercase=lowercase, strip_accents=strip_accents)

    @classmethod
    def from_dir(cls, directory: str | Path) -> WordPieceTokenizer:
        """Load a model or dataset folder holding `vocab.txt` (+ `tokenizer_config.json`).

        `do_lower_case`, `strip_accents` and `tokenize_chinese_chars` come from
        tokenizer_config.json; without it the folder is taken as uncased (BERT's default).
        """
        from data_prep.storage import is_local, is_uri, open_location

        if is_uri(directory) and not is_local(directory):
            return cls._from_remote_dir(open_location(directory))
        d = Path(open_location(directory).path if is_uri(directory) else directory)
        if (d / "tokenizer").is_dir() and not (d / "vocab.txt").is_file():
            d = d / "tokenizer"  # a prepared dataset folder
        settings: dict[str, Any] = {}
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            try:
                settings = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{cfg}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not (d / "vocab.txt").is_file():
            raise TokenizerError(f"{d}: no vocab.txt here; pass a model folder, a dataset "
                                 "folder (with tokenizer/) or a vocab.txt file")
        return cls(_read_vocab(d / "vocab.txt"),
                   lowercase=bool(settings.get("do_lower_case", True)),
                   strip_accents=settings.get("strip_accents"),
                   chinese_chars=bool(settings.get("tokenize_chinese_chars", True)))

    @classmethod
    def _from_remote_dir(cls, loc: Any) -> WordPieceTokenizer:
        """from_dir of a folder on an object store: its two small files, fetched into a
        temporary folder and loaded as a local one."""
        import tempfile

        if not loc.join("vocab.txt").is_file() and loc.join("tokenizer", "vocab.txt").is_file():
            loc = loc.join("tokenizer")
        if not loc.join("vocab.txt").is_file():
            raise TokenizerError(f"{loc.uri}: no vocab.txt here; pass a model folder, a "
                                 "dataset folder (with tokenizer/) or a vocab.txt file")
        with tempfile.TemporaryDirectory(prefix="bertflow-tokenizer-") as tmp:
            for name in ("vocab.txt", "tokenizer_config.json"):
                if loc.join(name).is_file():
                    (Path(tmp) / name).write_bytes(loc.join(name).read_bytes())
            return cls.from_dir(tmp)

    @classmethod
    def train(cls, files_or_iterator: Sequence[str | Path] | Iterable[str], vocab_size: int,
              lowercase: bool = True, min_frequency: int = 2) -> WordPieceTokenizer:
        """Train a WordPiece vocabulary of `vocab_size` on text files or an iterator of texts."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
            lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##")
        items = list(files_or_iterator) if isinstance(files_or_iterator, (list, tuple)) else None
        if items is not None and all(isinstance(x, Path) or Path(str(x)).is_file() for x in items):
            tok.train([str(x) for x in items], trainer)
        else:
            tok.train_from_iterator(items if items is not None else files_or_iterator, trainer)
        vocab = tok.get_vocab()
        ordered = sorted(vocab.items(), key=lambda kv: kv[1])
        return cls({t: i for i, (t, _) in enumerate(ordered)}, lowercase=lowercase)

    # ---- encoding -----------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]."""
        encode = getattr(self._tok, "encode_batch_fast", None)  # no offsets: faster
        if encode is None:  # tokenizers < 0.20
            encode = self._tok.encode_batch
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts: Sequence[str]
                            ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets into the original text) per text, for QA and NER."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, [tuple(o) for o in e.offsets]) for e in encs]

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of one text (e.g. ['un', '##aff', '##able'])."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        unk = self.unk_id
        return [self._vocab.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def continuation_mask(self) -> np.ndarray:
        """Bool array over ids: True where the piece continues a word (starts with '##').

        Whole-word masking uses `~continuation_mask()[ids]` as the word starts."""
        return np.array([t.startswith("##") for t in self._id_to_token], dtype=bool)

    # ---- properties ---------------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def lowercase(self) -> bool:
        return self._lowercase

    @property
    def cls_id(self) -> int:
        return self._vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self._vocab["[MASK]"]

    @property
    def pad_id(self) -> int:
        return self._vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self._vocab["[UNK]"]

    @property
    def special_ids(self) -> list[int]:
        return [self._vocab[t] for t in SPECIAL_TOKENS]

    # ---- persistence --------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"do_lower_case": self._lowercase, "strip_accents": self._strip_accents,
                "tokenize_chinese_chars": self._chinese_chars}

    def save(self, directory: str | Path) -> Path | str:
        """Write `vocab.txt` and `tokenizer_config.json` (loadable by transformers too);
        `directory` may be a URI (returned as given)."""
        from data_prep.storage import is_local, is_uri, open_location

        if is_uri(directory) and not is_local(directory):
            import tempfile

            loc = open_location(directory)
            with tempfile.TemporaryDirectory(prefix="bertflow-tokenizer-") as tmp:
                for f in Path(self.save(tmp)).iterdir():
                    loc.join(f.name).write_bytes(f.read_bytes())
            return str(directory)
        d = Path(open_location(directory).path if is_uri(directory) else directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.txt").write_text("".join(t + "\n" for t in self._id_to_token),
                                     encoding="utf-8")
        cfg = {**self.settings(), "tokenizer_class": "BertTokenizer",
               "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 512}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n",
                                                 encoding="utf-8")
        return d

    def fingerprint(self) -> str:
        """sha256 of the ordered vocabulary and the settings: equal hash, equal ids."""
        h = hashlib.sha256()
        h.update(json.dumps(self.settings(), sort_keys=True).encode())
        for token in self._id_to_token:
            h.update(token.encode("utf-8") + b"\n")
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, "
                f"lowercase={self._lowercase}, strip_accents={self._strip_accents})")

