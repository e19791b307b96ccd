"""The BERT encoder (Devlin et al. 2019) in plain torch, following the paper's picture:

    tokens -> word + position + segment embeddings -> LayerNorm
           -> L x [ self-attention -> add & norm -> feed-forward -> add & norm ]
           -> last_hidden_state; pooler = tanh(W h[CLS])

Speed without changing the maths (parity tests against transformers prove it):
- Unpadding (as in MosaicBERT): pad tokens are dropped after the lookup, so embeddings,
  every linear layer, GELU and LayerNorm run on the packed real tokens only, shape (N, H).
  Tokens are re-padded to (B, T) only around scaled_dot_product_attention.
- One fused qkv projection per layer (one GEMM instead of three).
- Two ways to compile. The whole model (`model.compile(fullgraph=True)`): under
  `static_shapes()` no shape depends on the data (the packed length N is data: a
  `nonzero`, a device->host sync and a graph break), so it runs every token of the padded
  batch with SDPA's key mask (N = B*T): one graph, no host sync, what a GPU wants. Or
  the layers only (`compile_layers`, regional compilation): the unpadding stays eager and
  the embeddings, layers (and MLM loss) compile with a dynamic N, so pads never reach a
  linear layer.
  On CPUs, where a sync costs nothing and the GEMMs are the time, pads are what decide:
  the whole model trained `mini` at 0.63x eager's tokens/s (lengths 32..128, about 40%
  pads), the layers 0.98-0.99x, the layers and the MLM loss 1.03x (`base`: layers 1.02x;
  bench/model_throughput.py --compile, docs/benchmarks.md).
Outputs at pad positions are zero (transformers leaves meaningless numbers there); mask them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bert_core import hf_compat
from bert_core.config import BertConfig
from bert_core.config_io import BertflowError

log = logging.getLogger("bert_core")
M = TypeVar("M", bound="BertPreTrainedModel")

# functools.partial rather than lambdas: models must pickle (Ray ships them between processes).
ACT_FNS = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclasses.dataclass
class BertOutput:
    """What the encoder returns. Pad positions of every (B, T, H) tensor are zero."""

    last_hidden_state: torch.Tensor  # (B, T, H)
    pooler_output: torch.Tensor | None  # (B, H); None when built without a pooler
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 x (B, T, H), embeddings first


def static_shapes() -> bool:
    """True while torch.compile (or torch.export) traces the model: then every shape must
    follow from the input shapes alone, so no unpadding and no sparse MLM decoder."""
    return torch.compiler.is_compiling()


class Padding:
    """Moves between the padded batch (B, T, ...) and the tokens the layers run on (N, ...).

    Eager: the packed real tokens (N = number of real tokens); with no padding in the batch
    both directions are free reshapes. Static shapes (`static_shapes()`): every position
    (N = B*T), pads masked out of attention as keys and zeroed in the outputs.
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len
        self.indices: torch.Tensor | None = None  # (N,) flat positions of real tokens
        self.key_mask: torch.Tensor | None = None  # (B, 1, 1, T) True where a key is real
        self.real: torch.Tensor | None = None  # (B*T, 1) static shapes: True on real tokens
        if attention_mask is None:
            return
        mask = attention_mask.bool()  # (B, T)
        if static_shapes():
            self.real = mask.reshape(batch * seq_len, 1)  # (B*T, 1)
            # A row without a real token attends to all of its (pad) keys: a query with
            # no key is NaN, and NaN reaches the weights' gradients through SDPA's backward.
            # Its outputs are zeroed, so what it attends to never matters.
            keys = mask | ~mask.any(dim=1, keepdim=True)  # (B, T)
            self.key_mask = keys[:, None, None, :]  # (B, 1, 1, T)
        elif not bool(mask.all()):
            self.indices = mask.flatten().nonzero().squeeze(1)  # (N,)
            self.key_mask = mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads/queries

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        flat = x.reshape(self.batch * self.seq_len, *x.shape[2:])  # (B*T, ...)
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def pad(self, x: torch.Tensor, zero_pads: bool = True) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at pad positions (with static shapes only when
        `zero_pads`: attention's inputs need not be zero there, its key mask hides them)."""
        if self.indices is not None:
            full = x.new_zeros(self.batch * self.seq_len, *x.shape[1:])  # (B*T, ...)
            x = full.index_copy(0, self.indices, x)
        elif self.real is not None and zero_pads:
            x = x.masked_fill(~self.real, 0.0)  # (B*T, H)
        return x.view(self.batch, self.seq_len, *x.shape[1:])


class BertEmbeddings(nn.Module):
    """Word + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))  # (N, H)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """One post-LayerNorm Transformer layer working on packed tokens (N, H)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(H, 3 * H)  # rows: [query; key; value]
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(H, I)
        self.ffn_out = nn.Linear(I, H)
        self.ffn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.act = ACT_FNS[config.hidden_act]
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def attention(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        B, T, nh, d = padding.batch, padding.seq_len, self.num_heads, self.head_dim
        qkv = padding.pad(self.qkv(x), zero_pads=False)  # (B, T, 3H)
        q, k, v = qkv.view(B, T, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, d)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=padding.key_mask,
            dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, d)
        y = y.transpose(1, 2).reshape(B, T, nh * d)  # (B, T, H)
        return self.attn_out(padding.unpad(y))  # (N, H)

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x, padding)))  # (N, H)
        h = self.act(self.ffn_in(x))  # (N, I)
        return self.ffn_norm(x + self.dropout(self.ffn_out(h)))  # (N, H)


class BertPooler(nn.Module):
    """tanh(W h[CLS] + b): the sentence vector the NSP and classification heads read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(last_hidden_state[:, 0]))  # (B, H)


class _SkipInPlace(TorchFunctionMode):
    """Skips in-place tensor ops (what weight initialisation is made of) while a model is
    built on the `meta` device to read its shapes: there is nothing to fill, and torch
    runs `normal_` on meta through reference kernels that import torch._dynamo (seconds
    on a first load)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes `tensor=`
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor):
            return target
        return func(*args, **kwargs)


class BertPreTrainedModel(nn.Module):
    """What every bert_core model shares: BERT init, Hugging Face folders, freezing."""

    # Where the encoder lives in this class ("" for BertModel, "bert." for heads) and how
    # the head's own modules are named in transformers (ours -> HF).
    hf_encoder_prefix = "bert."
    hf_head_names: dict[str, str] = {}
    hf_architecture = "BertModel"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.loading_info: dict[str, list[str]] = {"missing_keys": [], "unexpected_keys": []}

    # --- initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def init_weights(self) -> None:
        """BERT's initialisation: normal(0, initializer_range), LayerNorm 1/0, biases 0."""
        self.apply(self._init_module)

    # --- parameters --------------------------------------------------------------------
    @property
    def encoder(self) -> BertModel:
        """The BertModel inside this model (the model itself for BertModel)."""
        return self.bert  # type: ignore[attr-defined, return-value]

    def freeze_encoder(self) -> None:
        """Stop gradients into the encoder, so only the task head trains ("frozen" BERT).

        For MLM heads the decoder is tied to the word embeddings, which freeze too.
        """
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def compile_layers(self, **compile_kwargs: Any) -> None:
        """Regional compilation, in place (parameter names unchanged): `torch.compile` the
        embeddings and every encoder layer (`fullgraph=True`, dynamic shapes), the
        unpadding between them and the head left eager, so the compiled code sees the
        packed real tokens (N, H) as eager mode does. The layers are one class and share
        one compiled graph: a single compile (forward and backward) serves every layer
        and every batch shape; a batch without pads and eval mode compile once more each.
        The masked-LM loss of the MLM heads (`MaskedLMLoss`, over the M decoded tokens)
        compiles the same way. `compile_kwargs` go to torch.compile (`backend=`,
        `options=`)."""
        encoder = self.encoder
        loss = getattr(self, "mlm_loss", None)
        for module in (encoder.embeddings, *encoder.layers, *([loss] if loss else [])):
            module.compile(fullgraph=True, dynamic=True, **compile_kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (tied tensors counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- Hugging Face folders ----------------------------------------------------------
    def _name_map(self) -> hf_compat.NameMap:
        return hf_compat.NameMap(self.hf_encoder_prefix, self.hf_head_names)

    @classmethod
    def from_pretrained(cls: type[M], folder: str | Path, strict: bool = False,
                        **config_overrides: Any) -> M:
        """Load a Hugging Face-format folder (config.json + model.safetensors).

        Any BERT class's folder loads into any bert_core class: the encoder is found with or
        without the `bert.` prefix; head weights absent from the file start from BERT's
        init. Missing / unexpected tensors are logged by name and kept in
        `model.loading_info`; with strict=True they are an error. `config_overrides` change
        the config first (e.g. `num_labels=3` for a new classification head).
        """
        folder = Path(folder)
        config = cls.check_pretrained(folder, **config_overrides)
        tensors = hf_compat.read_safetensors(folder)
        model = cls(config)  # allocated only now: the files were checked to hold it
        state, missing, unexpected = hf_compat.split_file_tensors(
            model._name_map(), tensors, list(model.state_dict()))
        if strict and (missing or unexpected):
            raise BertflowError(f"{folder}: does not match {cls.__name__}: missing "
                                f"{missing or 'none'}; unexpected {unexpected or 'none'}")
        own = model.state_dict()
        for name, tensor in list(state.items()):
            if tensor.shape == own[name].shape:
                continue
            in_head = not isinstance(model, BertModel) and not name.startswith("bert.")
            if config_overrides and in_head:
                # The caller asked for a different head (e.g. num_labels): start it afresh.
                del state[name]
                missing = sorted(set(missing) | set(model._name_map().to_hf(name)))
                continue
            raise BertflowError(
                f"{folder}: tensor for {name} has shape {tuple(tensor.shape)} but "
                f"{cls.__name__} with this config needs {tuple(own[name].shape)}; check "
                "num_labels / vocab_size against the checkpoint's config.json")
        model.load_state_dict(state, strict=False)
        if missing:
            log.warning("%s: %d weights not in %s, newly initialised: %s", cls.__name__,
                        len(missing), folder, ", ".join(missing))
        if unexpected:
            log.warning("%s: %d weights in %s not used: %s", cls.__name__, len(unexpected),
                        folder, ", ".join(unexpected))
        model.loading_info = {"missing_keys": missing, "unexpected_keys": unexpected}
        return model

    @classmethod
    def check_pretrained(cls, folder: str | Path, **config_overrides: Any) -> BertConfig:
        """The config of the model folder `folder` for this class, after checking from
        config.json and the safetensors headers alone that the weights can be this model
        (`hf_compat.check_weights_fit`; the model is built on the `meta` device, so
        nothing is allocated). What `from_pretrained` does first, and what a driver calls
        before any Ray work."""
        folder = Path(folder)
        data = hf_compat.read_config_json(folder)
        config = BertConfig.from_hf_dict(data, str(folder / "config.json"))
        if config_overrides:
            config = config.replace(**config_overrides)
        with torch.device("meta"), _SkipInPlace():
            skeleton = cls(config)
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        hf_compat.check_weights_fit(folder, skeleton._name_map(), shapes,
                                    head_may_differ=bool(config_overrides))
        return config

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors that the matching transformers class loads.

        Tied decoder weights are stored once (as the word embeddings), as transformers does.
        """
        folder = Path(folder)
        tensors = self._name_map().state_dict_to_hf(self.state_dict())
        hf_compat.write_folder(folder, self.config.to_hf_dict(self.hf_architecture), tensors)
        return folder


class BertModel(BertPreTrainedModel):
    """The BERT encoder: token ids in, contextual vectors (and the pooled [CLS]) out."""

    hf_encoder_prefix = ""
    hf_architecture = "BertModel"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    @property
    def encoder(self) -> BertModel:
        return self

    def encode_packed(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      output_hidden_states: bool = False,
                      ) -> tuple[torch.Tensor, Padding, list[torch.Tensor]]:
        """Run the encoder on the real tokens only: (packed (N, H), padding, hidden states)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise BertflowError(f"sequence length {T} exceeds max_position_embeddings="
                                f"{self.config.max_position_embeddings}; truncate the input")
        padding = Padding(attention_mask, B, T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        x = self.embeddings(padding.unpad(input_ids), padding.unpad(positions),
                            padding.unpad(token_type_ids))  # (N, H)
        hidden = [x] if output_hidden_states else []
        for layer in self.layers:
            x = layer(x, padding)  # (N, H)
            if output_hidden_states:
                hidden.append(x)
        return x, padding, hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> BertOutput:
        """Encode a batch. input_ids, attention_mask (1 = real token), token_type_ids: (B, T)."""
        x, padding, hidden = self.encode_packed(input_ids, attention_mask, token_type_ids,
                                                output_hidden_states)
        last = padding.pad(x)  # (B, T, H)
        pooled = self.pooler(last) if self.pooler is not None else None  # (B, H)
        states = tuple(padding.pad(h) for h in hidden) if output_hidden_states else None
        return BertOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)
