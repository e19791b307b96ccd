"""PrepConfig: every setting of `bertflow prep` (stdlib only, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bert_core.config_io import check, field


@dataclass
class PrepConfig:
    """Turn raw text into a pretraining dataset (Google's create_pretraining_data recipe)."""

    input: list[str] = field(default_factory=list, help="input files, folders or globs "
                             "(.txt BERT format, .jsonl/.parquet with a text field; .gz ok)")
    output: str = field("", help="dataset folder to write (appears atomically)")
    vocab: str | None = field(None, help="WordPiece vocab.txt, a model/dataset folder "
                              "holding one, or a registered model (models:/NAME@ALIAS, "
                              "models:/NAME/VERSION: its vocabulary, recorded as the exact "
                              "version)")
    tracking_uri: str | None = field(
        None, help="MLflow store of a --vocab models:/... (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///./mlruns.db)")
    train_vocab: int = field(0, help="train a WordPiece vocabulary of this size on the "
                             "corpus instead of --vocab (0: off)")
    lowercase: bool = field(True, help="lowercase and strip accents (uncased BERT); with "
                            "--vocab FOLDER its tokenizer_config.json decides")
    max_seq_len: int = field(128, help="tokens per instance including [CLS]/[SEP]")
    objective: Literal["nsp", "sop", "mlm"] = field(
        "nsp", help="nsp: next sentence (BERT), sop: sentence order (ALBERT), mlm: no pairs")
    masking: Literal["static", "dynamic"] = field(
        "static", help="static: masks written by prep (dupe_factor copies); dynamic: "
        "masked at training time")
    dupe_factor: int = field(10, help="times each document is turned into instances, "
                             "each with its own pairing and mask (Google's default 10)")
    masked_lm_prob: float = field(0.15, help="fraction of tokens to mask")
    max_predictions_per_seq: int = field(20, help="at most this many masked tokens per instance")
    short_seq_prob: float = field(0.1, help="probability of a shorter target length "
                                  "(so the model sees short sequences)")
    whole_word_mask: bool = field(False, help="mask all WordPieces of a word together")
    val_fraction: float = field(0.01, help="fraction of documents (by hash) held out for "
                                "validation")
    seed: int = field(12345, help="random seed; same seed and inputs give identical rows")
    force: bool = field(False, help="rebuild even when the output is up to date, and "
                        "replace a folder that is not a bertflow dataset")
    address: str | None = field(None, help="Ray cluster address (default: none: this "
                                "machine's processes run every pass, with no Ray)")
    tokenize_workers: int = field(0, help="items of a pass at once: processes of this "
                                  "machine, or tasks on Ray (0: one per CPU of this machine, "
                                  "or of the Ray cluster); never changes the output",
                                  renamed_from=("num_workers",))
    tokenize_on: Literal["auto", "driver", "ray"] = field(
        "auto", help="where text is tokenized: driver (this machine: processes of this "
        "one, one per core, each tokenizer on one thread), ray (Ray tasks on the cluster's "
        "nodes; with no --address every pass then runs on a private local Ray) or auto "
        "(driver, unless --address names a cluster of several nodes); never changes the "
        "output")
    num_parts: int = field(0, help="Parquet parts per split (0: the default rule: parts of "
                           "about 64 MB, at least 64 once a split holds 64 MB, none under "
                           "1 MB). Training workers read disjoint parts, so a split wants "
                           "at least as many parts as micro-batches per optimizer step")
    docs_per_unit: int = field(1000, help="documents per work unit (a unit of tasks and of "
                               "worker memory); never changes the output")
    max_line_bytes: int = field(1_000_000, help="lines longer than this are not read; "
                                "their document is skipped and counted (line_too_long)")
    text_column: str = field("text", help="field/column holding the text in .jsonl/.parquet",
                             renamed_from=("text_field",))
    max_decompressed_bytes: int = field(8 << 30, help="a .gz input is read up to this many "
                                        "decompressed bytes (gzip bombs); the rest is "
                                        "dropped and counted (decompressed_too_large)")

    def __post_init__(self) -> None:
        check(self.max_seq_len >= 8, "max_seq_len", f"must be at least 8, got {self.max_seq_len}")
        check(self.max_seq_len <= 8192, "max_seq_len", f"must be at most 8192, got {self.max_seq_len}")
        check(self.dupe_factor >= 1, "dupe_factor", "must be at least 1")
        check(0.0 < self.masked_lm_prob < 1.0, "masked_lm_prob", "must be in (0, 1)")
        check(self.max_predictions_per_seq >= 1, "max_predictions_per_seq", "must be >= 1")
        check(0.0 <= self.short_seq_prob <= 1.0, "short_seq_prob", "must be in [0, 1]")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.train_vocab == 0 or self.train_vocab >= 100, "train_vocab",
              "must be 0 (off) or a vocabulary size of at least 100")
        check(not (self.vocab and self.train_vocab), "vocab",
              "give either --vocab or --train-vocab, not both")
        check(self.tokenize_workers >= 0, "tokenize_workers", "must be >= 0")
        check(self.tokenize_on in ("auto", "driver", "ray"), "tokenize_on",
              f"must be auto, driver or ray, got {self.tokenize_on!r}")
        check(self.docs_per_unit >= 1, "docs_per_unit", "must be >= 1")
        check(0 <= self.num_parts <= 100_000, "num_parts", "must be 0 (the default rule) to 100000")
        check(self.max_line_bytes >= 1024, "max_line_bytes", "must be at least 1024")
        check(self.max_decompressed_bytes >= 1 << 20, "max_decompressed_bytes",
              "must be at least 1048576 (1 MiB)")

    def validate_for_run(self) -> None:
        """Checks that only apply when running (a YAML may leave inputs to the CLI)."""
        check(bool(self.input), "input", "give at least one --input file, folder or glob")
        check(bool(self.output), "output", "give --output DIR")
        check(bool(self.vocab) or self.train_vocab > 0, "vocab",
              "give --vocab vocab.txt (or a model folder) or --train-vocab SIZE")



# Fields that change nothing in the output; they stay out of the build fingerprint.
RUNTIME_ONLY = ("force", "address", "tokenize_workers", "output", "docs_per_unit",
                "tracking_uri", "tokenize_on")
# Fields renamed since datasets were first fingerprinted: the fingerprint keeps the name it
# was computed under, so a rename never makes an existing dataset STALE.
FINGERPRINT_NAMES = {"text_column": "text_field"}
