"""The one adapter between bert_core parameter names and Hugging Face BERT names.

bert_core lays its parameters out for speed and readability (one fused `qkv` projection per
layer, short names); Hugging Face checkpoints use `encoder.layer.N.attention.self.query` and
friends. Everything that reads or writes a model folder goes through this module, so the
internal layout can change without breaking checkpoints in either direction.

Folder format (what transformers writes and reads): `config.json` + `model.safetensors`
(or sharded `model.safetensors.index.json`). Pickled `pytorch_model.bin` files are refused:
unpickling a downloaded file can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from bert_core.config_io import BertflowError

log = logging.getLogger("bert_core")

# (our name regex, HF name template) for the encoder, relative to the encoder's own prefix.
# The fused qkv projection is handled separately (one tensor <-> three).
_ENCODER_NAMES: list[tuple[str, str]] = [
    (r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"embeddings.\1.weight"),
    (r"embeddings\.norm\.(weight|bias)", r"embeddings.LayerNorm.\1"),
    (r"layers\.(\d+)\.attn_out\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)",
     r"encoder.layer.\1.attention.output.LayerNorm.\2"),
    (r"layers\.(\d+)\.ffn_in\.(weight|bias)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"layers\.(\d+)\.ffn_out\.(weight|bias)", r"encoder.layer.\1.output.dense.\2"),
    (r"layers\.(\d+)\.ffn_norm\.(weight|bias)", r"encoder.layer.\1.output.LayerNorm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
]
_QKV = re.compile(r"layers\.(\d+)\.qkv\.(weight|bias)")
_QKV_PARTS = ("query", "key", "value")

# Tensors HF files may carry that hold nothing to learn (buffers, tied copies).
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_HF_ENCODER_ROOTS = ("embeddings.", "encoder.", "pooler.")


_FORWARD = [(re.compile(ours), hf) for ours, hf in _ENCODER_NAMES]


def encoder_name_to_hf(name: str) -> list[str]:
    """HF names of one encoder parameter (three for the fused qkv projection)."""
    m = _QKV.fullmatch(name)
    if m:
        return [f"encoder.layer.{m[1]}.attention.self.{part}.{m[2]}" for part in _QKV_PARTS]
    for regex, template in _FORWARD:
        m = regex.fullmatch(name)
        if m:
            return [m.expand(template)]
    raise KeyError(f"no Hugging Face name for encoder parameter {name!r}")


class NameMap:
    """Maps one model class's state-dict names to HF names and back.

    `encoder_prefix` is where the encoder sits in the model ("" for BertModel, "bert." for
    heads, as in transformers); `head_names` maps head module prefixes (ours -> HF).
    """

    def __init__(self, encoder_prefix: str, head_names: dict[str, str]):
        self.encoder_prefix = encoder_prefix
        self.head_names = head_names

    def to_hf(self, name: str) -> list[str]:
        """HF names of our parameter `name`."""
        if self.encoder_prefix and name.startswith(self.encoder_prefix):
            rest = name[len(self.encoder_prefix):]
            return [self.encoder_prefix + n for n in encoder_name_to_hf(rest)]
        if not self.encoder_prefix:
            try:
                return encoder_name_to_hf(name)
            except KeyError:
                pass
        for ours, hf in self.head_names.items():
            if name.startswith(ours + ".") or name == ours:
                return [hf + name[len(ours):]]
        raise KeyError(f"no Hugging Face name for parameter {name!r}")

    def state_dict_to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> HF tensors on the CPU (qkv split, contiguous, no shared storage)."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            hf_names = self.to_hf(name)
            parts = tensor.chunk(len(hf_names), dim=0)  # qkv rows are [query; key; value]
            for hf_name, part in zip(hf_names, parts):
                out[hf_name] = part.detach().to("cpu", copy=True).contiguous()
        return out

    def normalise_prefix(self, names: list[str]) -> dict[str, str]:
        """file name -> name as this class expects it (add or strip `bert.` for the encoder).

        Whichever BERT class saved the folder, its encoder tensors are found: BertModel saves
        them bare, every head under `bert.`.
        """
        has_prefix = any(n.startswith("bert.") for n in names)
        mapping = {}
        for n in names:
            if self.encoder_prefix and not has_prefix and n.startswith(_HF_ENCODER_ROOTS):
                mapping[n] = self.encoder_prefix + n
            elif not self.encoder_prefix and n.startswith("bert."):
                mapping[n] = n[len("bert."):]
            else:
                mapping[n] = n
        return mapping


# --- folders ---------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20  # config.json / index.json larger than this is not a config
_LAYER = re.compile(r"(?:bert\.)?encoder\.layer\.(\d+)\.")


def _read_json(path: Path, what: str) -> Any:
    """A small JSON file of a model folder, parsed; every failure is a BertflowError
    naming the file (bad bytes, huge numbers and deep nesting included)."""
    if not path.is_file():
        raise BertflowError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BertflowError(f"{path}: {path.stat().st_size} bytes is too large for {what} "
                            f"(limit {MAX_CONFIG_BYTES})")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise BertflowError(f"{path}: not UTF-8 (byte {exc.start}); {what} must be UTF-8 "
                            "JSON") from None
    except json.JSONDecodeError as exc:
        raise BertflowError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, deep nesting
        raise BertflowError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from None


def read_config_json(folder: Path) -> dict[str, Any]:
    """The parsed config.json of a model folder, with the path named in any error.

    When the folder holds weights, the config is checked against the tensor shapes in the
    safetensors headers (no tensor is read), so a hostile config (`vocab_size: 1e12`,
    `num_hidden_layers: 1e6`) is refused before anything is allocated."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise BertflowError(f"{folder}: model folder not found")
    if not path.exists():
        raise BertflowError(f"{path}: missing; a model folder needs config.json and "
                            "model.safetensors (as written by save_pretrained)")
    data = _read_json(path, "config.json")
    if files := weight_files(folder, required=False):
        from bert_core.config import BertConfig

        config = BertConfig.from_hf_dict(data, str(path))
        check_config_shapes(config, tensor_shapes(folder), str(path))
        size = sum(f.stat().st_size for f in files)
        if (n := encoder_parameter_count(config)) > size:
            raise BertflowError(
                f"{path}: describes an encoder of {n:,} parameters, but the weight files "
                f"hold {size:,} bytes (at least one per parameter); fix config.json to "
                "match the weights")
    return data


def encoder_parameter_count(config: Any) -> int:
    """Parameters of the encoder a config describes (embeddings and layers, no pooler), in
    closed form: what the weight files must hold, checked before anything is built."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embeddings = (config.vocab_size + config.max_position_embeddings
                  + config.type_vocab_size) * H + 2 * H
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H  # qkv+out, ffn in/out, 2 norms
    return embeddings + L * layer


def weight_files(folder: Path, required: bool = True) -> list[Path]:
    """The safetensors file(s) of a model folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` names, each confined to the folder (a shard name that
    is a path is refused). Pickled weights are refused."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        data = _read_json(index, "a safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise BertflowError(f"{index}: expected a \"weight_map\" of tensor name -> shard "
                                "file name")
        return [_confined(folder, name, index) for name in sorted(set(weight_map.values()))]
    if not required:
        return []
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise BertflowError(
            f"{folder}: has {', '.join(sorted(pickled))} but no model.safetensors. "
            "bertflow never unpickles weight files (a pickle can run arbitrary code). If "
            "you trust the file, convert it once with transformers: python -c \"from "
            "transformers import AutoModel; AutoModel.from_pretrained('DIR')"
            ".save_pretrained('DIR')\" (writes model.safetensors), then retry.")
    raise BertflowError(f"{folder}: no model.safetensors found")


def _confined(folder: Path, name: str, source: Path) -> Path:
    """`folder/name` when `name` is a plain .safetensors file name (no folder part, no
    `..`, not absolute); else a BertflowError naming `source`. (A file that is itself a
    symlink is allowed: Hugging Face's cache links snapshot files to its blob store.)"""
    if Path(name).name != name or name in (".", "..") or "\\" in name \
            or not name.endswith(".safetensors"):
        raise BertflowError(f"{source}: weight file {name!r} is not a plain .safetensors file "
                            "name in the model folder; refusing to read outside it")
    path = folder / name
    if not path.is_file():
        raise BertflowError(f"{path}: weight file missing (named by {source.name})")
    return path


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files, from their
    headers only (nothing is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
        except Exception as exc:  # safetensors raises its own error types
            raise BertflowError(f"{f}: cannot read safetensors header: {exc}") from None
    return shapes


def check_config_shapes(config: Any, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config that disagrees with the checkpoint's tensor shapes (vocab_size,
    hidden_size, num_hidden_layers, intermediate_size, max_position_embeddings,
    type_vocab_size), naming the field; the model is then never built at a size the
    file does not hold."""
    def find(suffix: str) -> tuple[str, tuple[int, ...]] | None:
        for prefix in ("bert.", ""):
            if prefix + suffix in shapes:
                return prefix + suffix, shapes[prefix + suffix]
        return None

    def expect(suffix: str, want: tuple[int, ...], fields: tuple[str, ...],
               required: bool = False) -> None:
        found = find(suffix)
        if found is None:
            if required:
                raise BertflowError(f"{source}: the weights hold no {suffix}; not a BERT "
                                    "checkpoint (or a folder for another architecture)")
            return
        name, shape = found
        if shape != want:
            said = ", ".join(f"{f}={getattr(config, f)}" for f in fields)
            raise BertflowError(f"{source}: {said} needs {name} of shape {want}, but the "
                                f"weights hold {shape}; fix config.json to match the weights")

    H = config.hidden_size
    expect("embeddings.word_embeddings.weight", (config.vocab_size, H),
           ("vocab_size", "hidden_size"), required=True)
    expect("embeddings.position_embeddings.weight", (config.max_position_embeddings, H),
           ("max_position_embeddings", "hidden_size"))
    expect("embeddings.token_type_embeddings.weight", (config.type_vocab_size, H),
           ("type_vocab_size", "hidden_size"))
    layers = {int(m[1]) for n in shapes if (m := _LAYER.match(n))}
    if layers != set(range(config.num_hidden_layers)):
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no encoder layers"
        raise BertflowError(f"{source}: num_hidden_layers={config.num_hidden_layers} but the "
                            f"weights hold {held}; fix config.json to match the weights")
    expect("encoder.layer.0.intermediate.dense.weight", (config.intermediate_size, H),
           ("intermediate_size", "hidden_size"))


def vocab_file_size(vocab_txt: Path) -> int:
    """Token count of a WordPiece vocab.txt: its number of lines (a line's index is its
    id), counted in chunks without decoding."""
    count, last = 0, b"\n"
    with open(vocab_txt, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def check_tokenizer_fits(folder: str | Path, vocab_size: int) -> None:
    """Refuse a model folder whose `vocab.txt` has more tokens than the model's
    `vocab_size`: its ids past the end would fail (IndexError) only at predict time.
    A folder without vocab.txt passes (its tokenizer comes from elsewhere)."""
    vocab = Path(folder) / "vocab.txt"
    if not vocab.is_file():
        return
    n = vocab_file_size(vocab)
    if n > vocab_size:
        raise BertflowError(
            f"{vocab}: has {n} tokens but the model's config.json says vocab_size "
            f"{vocab_size}; ids {vocab_size}..{n - 1} have no embedding. Use the vocab.txt "
            "the model was trained with")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single or sharded safetensors); pickles are refused."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            tensors.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise BertflowError(f"{f}: cannot read safetensors file: {exc}") from None
    return tensors


def _as_expected(names: NameMap, file_items: dict[str, Any]) -> dict[str, Any]:
    """File entries (tensors or shapes) under the HF names this class expects: the `bert.`
    prefix added or stripped, buffers and tied decoder copies dropped."""
    renamed = names.normalise_prefix(list(file_items))
    hf = {renamed[k]: v for k, v in file_items.items()
          if not renamed[k].endswith(_IGNORED_SUFFIXES)}
    # Tied copies of the word embeddings: older files carry the decoder bias under its
    # own name only; the decoder weight is always the embedding matrix.
    if "cls.predictions.decoder.bias" in hf and "cls.predictions.bias" not in hf:
        hf["cls.predictions.bias"] = hf["cls.predictions.decoder.bias"]
    for key in _TIED_DECODER:
        hf.pop(key, None)
    return hf


def expected_hf_shapes(names: NameMap, own_shapes: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a model with these parameter shapes loads (the
    fused qkv split into its three parts)."""
    out: dict[str, tuple[int, ...]] = {}
    for ours, shape in own_shapes.items():
        hf_names = names.to_hf(ours)
        part = (shape[0] // len(hf_names), *shape[1:]) if shape else shape
        out.update({h: part for h in hf_names})
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_weights_fit(folder: Path, names: NameMap, own_shapes: dict[str, tuple[int, ...]],
                      head_may_differ: bool = False) -> None:
    """Refuse, before anything is allocated, weights that cannot be this model: from the
    safetensors headers only (`own_shapes` come from the model built on the `meta`
    device). Every encoder tensor (embeddings and layers; the pooler may be absent, as in
    MLM checkpoints) must be in the files with exactly the shape the config implies; the
    parameters the files hold cannot outnumber their bytes; and what would be newly
    initialised (heads) cannot outgrow what the files hold. A hostile config.json with a
    tiny weight file is an error here, not terabytes of allocation."""
    files = weight_files(folder)
    in_file = _as_expected(names, tensor_shapes(folder))
    expected = expected_hf_shapes(names, own_shapes)
    enc = names.encoder_prefix

    def is_encoder(hf_name: str) -> bool:
        rest = hf_name[len(enc):] if enc and hf_name.startswith(enc) else hf_name
        return rest.startswith(("embeddings.", "encoder."))

    missing = sorted(h for h in expected if is_encoder(h) and h not in in_file)
    if missing:
        listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                           else "")
        raise BertflowError(f"{folder}: the weights lack {len(missing)} encoder tensors that "
                            f"config.json implies ({listed}); config.json and the weights "
                            "disagree, or the file is incomplete")
    from_file = new = 0
    for h, shape in expected.items():
        have = in_file.get(h)
        if have is None:
            new += _numel(shape)
        elif tuple(have) == shape:
            from_file += _numel(shape)
        elif is_encoder(h) or h.startswith(enc + "pooler.") or not head_may_differ:
            raise BertflowError(f"{folder}: tensor {h} has shape {tuple(have)} in the weights "
                                f"but config.json implies {shape}; fix config.json to match "
                                "the weights")
        else:
            new += _numel(shape)  # a head the caller resized (e.g. num_labels): new
    size = sum(f.stat().st_size for f in files)
    if from_file > size:
        raise BertflowError(f"{folder}: config.json implies {from_file} parameters from the "
                            f"weights, but the weight files hold only {size} bytes")
    if new > from_file + (1 << 24):
        raise BertflowError(f"{folder}: {new} parameters would be newly initialised (not in "
                            f"the weights, which hold {from_file}); check num_labels and the "
                            "task against the checkpoint")


def split_file_tensors(names: NameMap, file_tensors: dict[str, torch.Tensor],
                       expected: list[str]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Match file tensors to our parameters.

    Returns (our state dict to load, missing HF names, unexpected HF names). A fused qkv
    parameter is loaded only when all three of query/key/value are present.
    """
    hf = _as_expected(names, file_tensors)
    expected_hf = {h: ours for ours in expected for h in names.to_hf(ours)}
    missing = sorted(h for h in expected_hf if h not in hf)
    unexpected = sorted(h for h in hf if h not in expected_hf)
    state: dict[str, torch.Tensor] = {}
    for ours in expected:
        hf_names = names.to_hf(ours)
        if all(h in hf for h in hf_names):
            parts = [hf[h] for h in hf_names]
            state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return state, missing, unexpected


def _atomic_write(path: Path, write) -> None:
    """Write a file through a temporary sibling and rename, so no half file is visible."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(folder: Path, config_json: dict[str, Any],
                 tensors: dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors (each atomically) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "model.safetensors",
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_json, indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text, "utf-8"))
