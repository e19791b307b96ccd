"""What several test modules build: corpora, a tiny Hugging Face BERT, the toy regression
task the training engine is tested on, and a stand-in for Ray Data's shard iterator.
Import from here (`from tests.helpers import ...`), never from another test module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------- corpora

ADJ = "red green blue small large old new quiet loud bright".split()
NOUN = "cat dog bird river city garden teacher farmer engine violin".split()
VERB = "sees finds likes follows paints builds carries visits".split()


def templated_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """BERT text format: documents of templated sentences ("the red cat sees the old
    dog ."), so a tiny model's MLM loss falls fast."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_docs):
        for _ in range(int(rng.integers(3, 8))):
            a, b = rng.choice(ADJ, 2)
            n1, n2 = rng.choice(NOUN, 2)
            lines.append(f"the {a} {n1} {rng.choice(VERB)} the {b} {n2} .")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pydoc_text(n_docs: int = 30) -> str:
    """Real English: the first `n_docs` topics of Python's own reference (pydoc_data),
    one document per paragraph, in BERT text format."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)[:n_docs]) + "\n"


def pydoc_corpus(path: Path, n_docs: int = 30) -> Path:
    path.write_text(pydoc_text(n_docs), encoding="utf-8")
    return path


# ---------------------------------------------------------------- models


def tiny_hf_bert(dest: Path, vocab_from: Path) -> Path:
    """A real (randomly initialised) tiny BERT in Hugging Face format, with the vocab of
    `vocab_from` (a model folder)."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(dest, safe_serialization=True)
    (dest / "vocab.txt").write_bytes((vocab_from / "vocab.txt").read_bytes())
    return dest


# Labels of the tiny task folders (`tiny_task_folder`).
TASK_LABELS = {"seq-cls": ["neg", "pos"], "pair-cls": ["no", "yes", "maybe"],
               "token-cls": ["O", "B-PER", "I-PER"]}


def tiny_task_folder(dest: Path, task: str, vocab_from: Path, seed: int = 0) -> Path:
    """A one-layer tiny model folder of `task` (random weights from `seed`), MiniLM's
    vocabulary, max_seq_len 64: what `bertflow finetune` writes, in a second."""
    import torch

    from bert_core.config import BertConfig
    from workflows.model_folder import TASK_HEADS, save_model_folder

    torch.manual_seed(seed)
    labels = TASK_LABELS.get(task, [])
    extra = ({"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {name: i for i, name in enumerate(labels)}} if labels else {})
    model = TASK_HEADS[task](BertConfig.preset("tiny", vocab_size=30522,
                                               num_hidden_layers=1, **extra))
    meta = {"task": task, "max_seq_len": 64, **({"labels": labels} if labels else {})}
    return save_model_folder(model, dest, vocab_from, meta)


# ---------------------------------------------------------------- tiny pretraining

VOCAB = 60
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def token_rows(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` token-id rows ([CLS] ... [SEP], 8 to 21 tokens) of the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[CLS], rng.integers(5, VOCAB, int(rng.integers(6, 20))), [SEP]])
            for _ in range(n)]


def tiny_pretrain_task(objective: str = "mlm"):
    """A PretrainTask of the tiny preset over VOCAB tokens, dynamic masking."""
    from bert_core import BertConfig
    from data_prep.masking import MaskingSpec
    from workflows.training.pretrain import PretrainTask

    config = BertConfig.preset("tiny", vocab_size=VOCAB).to_hf_dict("BertForMaskedLM")
    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP))
    return PretrainTask(model_config=config, init_dir=None, tokenizer_dir="", pad_id=PAD,
                        masking=spec, objective=objective)


def loop_settings(**changes):
    from workflows.config import LoopSettings

    return LoopSettings(**{"batch_size": 4, "seed": 7, "max_steps": 10, "warmup_steps": 0,
                           "eval_batches": 0, **changes})


# ---------------------------------------------------------------- the engine's toy task

TRUE_W = np.linspace(-1.0, 1.0, 8).astype(np.float32)


class RegressionTask:
    """y = x . TRUE_W + noise, learnt by a linear layer; rows carry `x` (8,) and `y`."""

    def __init__(self, pid_dir: str | None = None, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def load_model(self, model_dir: Path) -> nn.Module:
        from safetensors.torch import load_file

        model = self.build_model()
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        return model

    def collate(self, batch, rng):
        return {"x": torch.as_tensor(np.stack(batch["x"]), dtype=torch.float32),
                "y": torch.as_tensor(batch["y"], dtype=torch.float32)}

    def compute_loss(self, model, batch):
        if self.sleep_s:
            import time
            time.sleep(self.sleep_s)  # keeps the run long enough for the fault test
        pred = model(batch["x"]).squeeze(-1)
        loss = nn.functional.mse_loss(pred, batch["y"])
        close = (pred - batch["y"]).abs() < 0.1
        return loss, {"mse": loss.detach(), "close_correct": close.sum(),
                      "close_count": float(close.numel())}

    def evaluate(self, model, batches):
        total, n = 0.0, 0
        for b in batches:
            total += float(nn.functional.mse_loss(model(b["x"]).squeeze(-1), b["y"],
                                                  reduction="sum"))
            n += len(b["y"])
        return {"mse": total / max(1, n)}

    def save_model(self, model, model_dir: Path) -> None:
        from safetensors.torch import save_file

        model_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(model_dir / "model.safetensors"))
        (model_dir / "config.json").write_text(json.dumps({"model_type": "toy"}))


def make_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = x @ TRUE_W + rng.normal(scale=0.01, size=n).astype(np.float32)
    return [{"x": x[i], "y": float(y[i])} for i in range(n)]


def batch_of(rows: list[dict]) -> dict[str, torch.Tensor]:
    return RegressionTask().collate({"x": np.stack([r["x"] for r in rows]),
                                     "y": np.array([r["y"] for r in rows])}, None)


# ---------------------------------------------------------------- Ray Data stand-in


class FakeShard:
    """What the training loop uses of a Ray DataIterator: numpy batches of the Parquet
    schema, from a list of `input_ids` rows or from a pyarrow Table."""

    def __init__(self, data) -> None:
        self.data = data if hasattr(data, "column_names") else None
        self.rows = data if self.data is None else range(data.num_rows)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy",
                     drop_last: bool = False, prefetch_batches: int = 0):
        assert batch_format == "numpy"
        for i in range(0, len(self.rows), batch_size):
            n = len(self.rows[i:i + batch_size])
            if drop_last and n < batch_size:
                return
            if self.data is None:
                columns = {"input_ids": list(self.rows[i:i + n])}
            else:
                columns = self.data.slice(i, n).to_pydict()
            yield {k: _objects(v) for k, v in columns.items()}


def _objects(values: list) -> np.ndarray:
    if values and isinstance(values[0], (list, np.ndarray)):
        out = np.empty(len(values), dtype=object)
        out[:] = [np.asarray(v) for v in values]
        return out
    return np.asarray(values)
