"""`BertConfig`: the shape of a BERT, with the field names of Hugging Face's config.json.

Stdlib-only (no torch) so that configs, presets and the CLI stay instant to import.
A config round-trips through `to_hf_dict` / `from_hf_dict`, which is what `config.json`
holds, and through `config_io.to_dict` / `config_io.from_dict` (MLflow params, manifests).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from bert_core.config_io import ConfigError, check, field, from_dict

log = logging.getLogger(__name__)

# Activations the encoder implements (the names Hugging Face uses in config.json).
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# How BertForSequenceClassification turns token vectors into one sentence vector.
POOLINGS = ("cls", "mean", "mean_last4")

# Named sizes: layers / hidden / heads / intermediate. tiny is for tests and quick runs;
# mini is "BERT-mini" (Turc et al. 2019); base and large are the paper's models.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                 intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                 intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                  intermediate_size=4096),
}

# Upper bounds far above any real BERT (XLM-R: 250k tokens; BERT-large: 24 layers, 1024
# wide). A config.json beyond them is refused before anything is allocated for it.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 15, "num_hidden_layers": 256,
    "num_attention_heads": 1024, "intermediate_size": 1 << 17,
    "max_position_embeddings": 1 << 17, "type_vocab_size": 1 << 10, "num_labels": 1 << 17,
}

# config.json keys written by transformers that carry no meaning for the encoder's maths.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "use_cache",
    "gradient_checkpointing", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "chunk_size_feed_forward", "pruned_heads", "directionality", "task_specific_params",
    "problem_type", "_attn_implementation_autoset", "id2label", "label2id", "num_labels",
    "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type", "attn_implementation",
}

# config.json settings we do not implement, with the value we require and why.
_HF_REQUIRED = {
    "position_embedding_type": ("absolute", "only absolute position embeddings are implemented"),
    "is_decoder": (False, "bert_core is an encoder; causal/decoder BERT is not supported"),
    "add_cross_attention": (False, "cross-attention is not supported"),
    "tie_word_embeddings": (True, "the MLM decoder is always tied to the word embeddings"),
}


@dataclasses.dataclass
class BertConfig:
    """Hyper-parameters of a BERT encoder and its heads (Hugging Face config.json names)."""

    vocab_size: int = field(30522, help="WordPiece vocabulary size (the tokenizer decides it)")
    hidden_size: int = field(768, help="width H of every token vector")
    num_hidden_layers: int = field(12, help="number of Transformer layers L")
    num_attention_heads: int = field(12, help="attention heads per layer (must divide H)")
    intermediate_size: int = field(3072, help="width of the feed-forward layer (usually 4H)")
    hidden_act: str = field("gelu", help=f"feed-forward activation: {', '.join(ACTIVATIONS)}")
    hidden_dropout_prob: float = field(0.1, help="dropout on embeddings and residual branches")
    attention_probs_dropout_prob: float = field(0.1, help="dropout on attention weights")
    max_position_embeddings: int = field(512, help="longest sequence the model accepts")
    type_vocab_size: int = field(2, help="number of segment (token type) ids")
    layer_norm_eps: float = field(1e-12, help="LayerNorm epsilon")
    pad_token_id: int | None = field(0, help="id of [PAD]; its embedding row gets no gradient")
    initializer_range: float = field(0.02, help="std of the normal weight initialisation")
    classifier_dropout: float | None = field(
        None, help="dropout before classification heads (None: hidden_dropout_prob)")
    num_labels: int | None = field(
        None, help="outputs of classification heads (None: len(id2label), else 2)")
    id2label: dict[int, str] | None = field(
        None, help="label names of classification heads, by index")
    label2id: dict[str, int] | None = field(None, help="inverse of id2label (derived)")
    classifier_pooling: str = field(
        "cls", help="sentence vector of sequence classification: cls (tanh pooler over "
        "[CLS], BERT's fine-tuning), mean (last layer averaged over real tokens: the "
        "feature-based use, and what sentence-transformers models are trained for), "
        "mean_last4 (the last four layers concatenated, averaged: 4H wide). Only cls "
        "exports to transformers unchanged")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                  f"must be a positive integer, got {value!r}")
            check(value <= LIMITS[name], name, f"{value} is over the limit of {LIMITS[name]} "
                  "(no BERT is that large; is config.json damaged?)")
        check(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
              f"{self.hidden_size} is not divisible by num_attention_heads="
              f"{self.num_attention_heads}; pick a head count that divides it")
        check(self.hidden_act in ACTIVATIONS, "hidden_act",
              f"{self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value!r}")
        check(self.classifier_dropout is None or 0.0 <= self.classifier_dropout < 1.0,
              "classifier_dropout", f"must be in [0, 1) or None, got {self.classifier_dropout!r}")
        check(self.classifier_pooling in POOLINGS, "classifier_pooling",
              f"{self.classifier_pooling!r} is not one of {', '.join(POOLINGS)}")
        check(self.classifier_pooling != "mean_last4" or self.num_hidden_layers >= 4,
              "classifier_pooling", f"mean_last4 needs 4 layers, the model has "
              f"{self.num_hidden_layers}; use mean")
        check(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")
        check(self.initializer_range > 0, "initializer_range", "must be > 0")
        check(self.pad_token_id is None or 0 <= self.pad_token_id < self.vocab_size,
              "pad_token_id", f"{self.pad_token_id} is outside the vocabulary "
              f"(vocab_size={self.vocab_size})")
        self._settle_labels()

    def _settle_labels(self) -> None:
        """Make num_labels, id2label and label2id agree (JSON turns int keys into strings)."""
        check(self.num_labels is None or isinstance(self.num_labels, int)
              and 1 <= self.num_labels <= LIMITS["num_labels"], "num_labels",
              f"must be an integer in 1..{LIMITS['num_labels']}, got {self.num_labels!r}")
        if self.id2label is not None:
            check(len(self.id2label) <= LIMITS["num_labels"], "id2label",
                  f"{len(self.id2label)} labels is over the limit of {LIMITS['num_labels']}")
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError("id2label: keys must be label indices 0..n-1") from None
            check(sorted(self.id2label) == list(range(len(self.id2label))), "id2label",
                  f"keys must be 0..{len(self.id2label) - 1}, got {sorted(self.id2label)}")
            if self.num_labels is None:
                self.num_labels = len(self.id2label)
            check(self.num_labels == len(self.id2label), "num_labels",
                  f"{self.num_labels} disagrees with the {len(self.id2label)} names in id2label")
        if self.num_labels is None:
            self.num_labels = len(self.label2id) if self.label2id else 2
        check(isinstance(self.num_labels, int) and self.num_labels >= 1, "num_labels",
              f"must be a positive integer, got {self.num_labels!r}")
        if self.id2label is None and self.label2id:
            try:
                self.id2label = {int(i): str(name) for name, i in self.label2id.items()}
            except (TypeError, ValueError, OverflowError):
                raise ConfigError("label2id: values must be label indices 0..n-1") from None
            check(sorted(self.id2label) == list(range(self.num_labels)), "label2id",
                  "values must be 0..num_labels-1, each once")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = {name: i for i, name in self.id2label.items()}
        check(len(self.label2id) == self.num_labels, "id2label", "label names must be unique")

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """A named size (tiny, mini, base, large), with any field overridden.

        `BertConfig.preset("mini", vocab_size=tokenizer.vocab_size)` is the common use.
        """
        if name not in PRESETS:
            raise ConfigError(f"model size {name!r} is unknown; choose one of "
                              f"{', '.join(PRESETS)}")
        return from_dict(cls, {**PRESETS[name], **overrides}, f"preset {name!r}")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> BertConfig:
        """Build a config from a Hugging Face BERT config.json mapping.

        Bookkeeping keys (architectures, transformers_version, ...) are ignored; settings
        bert_core does not implement (relative positions, decoders, ...) are refused.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"{source}: model_type is {model_type!r}; bert_core loads BERT "
                              "checkpoints only (model_type 'bert')")
        for key, (required, why) in _HF_REQUIRED.items():
            if key in data and data[key] is not None and data[key] != required:
                raise ConfigError(f"{source}: {key}={data[key]!r} is not supported ({why}); "
                                  f"only {required!r} is")
        if data.get("problem_type") == "multi_label_classification":
            raise ConfigError(f"{source}: problem_type multi_label_classification is not "
                              "supported (sequence classification uses cross-entropy, or MSE "
                              "when num_labels is 1)")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        ignored = sorted(set(data) - names - _HF_BOOKKEEPING - set(_HF_REQUIRED))
        if ignored:
            log.debug("%s: ignoring config keys bert_core does not use: %s", source, ignored)
        # id2label is the source of truth in HF configs (num_labels is derived from it there).
        if data.get("id2label"):
            known.pop("num_labels", None)
            known.pop("label2id", None)
        return from_dict(cls, known, source)

    def to_hf_dict(self, architecture: str = "BertModel") -> dict[str, Any]:
        """The config.json mapping that transformers' BertConfig accepts."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["id2label"] = {str(i): name for i, name in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        out.update(model_type="bert", architectures=[architecture],
                   position_embedding_type="absolute", tie_word_embeddings=True)
        return out

    def replace(self, **changes: Any) -> BertConfig:
        """A copy with `changes` applied and re-validated.

        Changing num_labels without new id2label drops the old label names.
        """
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if {"num_labels", "id2label", "label2id"} & set(changes):
            data.update(num_labels=None, id2label=None, label2id=None)
        data.update(changes)
        return from_dict(type(self), data, "config")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads
