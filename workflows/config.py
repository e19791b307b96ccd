"""Configs of the training workflows: the loop, tracking, and the stages built on them.

Stdlib-only (like every config module) so that `bertflow pretrain --help` is instant.
`PretrainConfig` and `FinetuneConfig` are flat for the CLI and YAML: they inherit the
fields of `LoopSettings` (what the Ray Train loop needs) and `TrackingSettings` (where
MLflow records the run). Functions take only the slice they need:
`settings_slice(LoopSettings, cfg)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from bert_core.config_io import check, field

T = TypeVar("T")

MODEL_SIZES = ("tiny", "mini", "base", "large")


@dataclass(kw_only=True)
class LoopSettings:
    """What the one training loop (workflows.engine) needs: scale, optimisation, schedule,
    precision, checkpoints, failures, evaluation and logging cadence."""

    num_workers: int = field(1, help="Ray Train workers (one per GPU with --use-gpu)")
    use_gpu: bool = field(False, help="train on GPUs (NCCL); otherwise CPUs (gloo)")
    cpus_per_worker: float | None = field(
        None, help="CPUs reserved per worker; default 1 with GPUs, otherwise the local "
                   "cluster's CPUs minus one (left for Ray Data) shared by the workers, "
                   "at most 1 each (0.5 each for 2 workers on 2 cores)")
    batch_size: int = field(32, help="sequences per worker per micro-batch")
    grad_accum: int = field(1, help="micro-batches accumulated per optimizer step")
    lr: float = field(1e-4, help="peak learning rate (after warmup)")
    warmup_steps: int = field(100, help="optimizer steps of linear warmup from 0 to --lr")
    max_steps: int = field(1000, help="optimizer steps in total; the LR decays linearly to 0 at the end")
    optimizer: Literal["adamw", "lamb"] = field(
        "adamw", help="adamw, or lamb for large batches (layer-wise trust ratio)")
    weight_decay: float = field(0.01, help="decoupled weight decay (never on biases or LayerNorm)")
    adam_beta1: float = field(0.9, help="first-moment decay of AdamW/LAMB")
    adam_beta2: float = field(0.999, help="second-moment decay of AdamW/LAMB")
    adam_eps: float = field(1e-6, help="epsilon of AdamW/LAMB")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this (0 disables)")
    precision: Literal["fp32", "bf16", "fp16"] = field(
        "fp32", help="autocast precision; fp16 uses a gradient scaler")
    checkpoint_every: int = field(500, help="optimizer steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = field(2, help="how many of the latest checkpoints to keep")
    max_failures: int = field(0, help="worker-group restarts allowed (each resumes from the latest checkpoint)")
    eval_every: int = field(500, help="optimizer steps between validations (0: only at the end)")
    eval_batches: int = field(50, help="validation batches per evaluation (0: the whole val split)")
    log_every: int = field(10, help="optimizer steps between metric logs")
    seed: int = field(42, help="seed of initialisation, dropout and dynamic masking")
    storage_path: str | None = field(
        None, help="folder of Ray Train run folders (checkpoints); default ./runs")

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", "must be at least 1")
        check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker",
              "must be positive (fractions such as 0.5 are fine)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("warmup_steps", "checkpoint_every", "max_failures", "eval_every",
                     "eval_batches"):
            check(getattr(self, name) >= 0, name, "must be 0 or more")
        check(self.warmup_steps <= self.max_steps, "warmup_steps",
              f"{self.warmup_steps} is more than max_steps={self.max_steps}")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/adam_beta2",
              "must be in [0, 1)")
        check(self.adam_eps > 0, "adam_eps", "must be positive")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or positive")
        check(self.precision != "fp16" or self.use_gpu, "precision",
              "fp16 needs --use-gpu (on CPUs use bf16 or fp32)")


@dataclass(kw_only=True)
class TrackingSettings:
    """Where MLflow records runs and registers models."""

    tracking_uri: str | None = field(
        None, help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///./mlruns.db with artifacts in ./mlartifacts")
    experiment: str = field("bertflow", help="MLflow experiment name")
    register_as: str | None = field(
        None, help="register the final model under this name (a new version each time)")
    log_system_metrics: bool = field(True, help="log CPU/GPU/memory usage to the MLflow run")

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must not be empty")
        check(self.register_as is None or bool(self.register_as.strip()), "register_as",
              "must not be empty (leave it out to skip registering)")


@dataclass(kw_only=True)
class PretrainConfig(LoopSettings, TrackingSettings):
    """`bertflow pretrain`: masked-LM + NSP/SOP pretraining of a BERT on a prepared dataset."""

    data: str = field("", help="prepared dataset folder (from `bertflow prep`)")
    run_name: str = field("", help="name of the run; rerunning the same name resumes it")
    model_size: Literal["tiny", "mini", "base", "large"] = field(
        "tiny", help="BERT size preset (ignored with --model-config or --init)")
    model_config: str | None = field(
        None, help="HF-style config.json for the model instead of --model-size")
    init: str | None = field(
        None, help="start from this model: models:/NAME@ALIAS, models:/NAME/VERSION, "
                   "a checkpoint or a Hugging Face-format folder")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")

    def __post_init__(self) -> None:
        LoopSettings.__post_init__(self)
        TrackingSettings.__post_init__(self)
        check(not any(c in self.run_name for c in "/\\'\"`"), "run_name",
              f"{self.run_name!r} must not contain path separators or quotes")
        check(not (self.init and self.model_config), "init",
              "--init brings its own model config; leave out --model-config")

    def validate_for_run(self) -> None:
        """Checks that only apply when running (a YAML may leave these to the CLI)."""
        check(bool(self.data.strip()), "data", "give the prepared dataset folder (--data DIR)")
        check(bool(self.run_name.strip()), "run_name",
              "give the run a name (--run-name NAME); the same name resumes the run")


def settings_slice(cls: type[T], cfg: Any) -> T:
    """The `cls` part of a flat config (e.g. the LoopSettings of a PretrainConfig)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: getattr(cfg, n) for n in names})


FINETUNE_TASKS = ("seq-cls", "pair-cls", "token-cls", "qa")


@dataclass(kw_only=True)
class FinetuneConfig(LoopSettings, TrackingSettings):
    """`bertflow finetune`: train a task head (and the encoder unless frozen) from a BERT,
    evaluate it, log it as a servable MLflow model and register it with its lineage."""

    task: Literal["seq-cls", "pair-cls", "token-cls", "qa"] = field(
        "seq-cls", help="seq-cls (text,label), pair-cls (text_a,text_b,label), "
                        "token-cls (CoNLL, BIO tags) or qa (SQuAD v1.1/v2.0 JSON)")
    base: str = field("", help="model to start from: models:/NAME@ALIAS, models:/NAME/VERSION, "
                               "a checkpoint folder or a Hugging Face-format BERT folder")
    train: str = field("", help="training file (CSV/TSV/JSONL, CoNLL, or SQuAD JSON)")
    eval: str | None = field(None, help="evaluation file in the same format (metrics each epoch)")
    labels: list[str] | None = field(
        None, help="label names in id order; default: sorted labels of the training file")
    freeze_encoder: bool = field(False, help="train only the task head on the frozen encoder")
    epochs: float = field(3.0, help="passes over the training set (sets the number of steps)")
    max_seq_len: int = field(128, help="word pieces per example, specials included")
    doc_stride: int = field(128, help="qa: context pieces between the starts of two windows")
    max_query_len: int = field(64, help="qa: question pieces kept")
    max_answer_length: int = field(30, help="qa: longest answer in word pieces")
    n_best: int = field(20, help="qa: start and end candidates considered per window")
    null_score_threshold: float = field(
        0.0, help="qa v2.0: answer nothing when the null score beats the best span by more")
    warmup_ratio: float = field(0.1, help="fraction of the steps spent warming up "
                                          "(used when --warmup-steps is 0)")
    run_name: str | None = field(None, help="MLflow run name (default: finetune-TASK)")
    data_dir: str | None = field(
        None, help="folder for the tokenized task datasets (default: ./data/finetune)")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")
    # Fine-tuning defaults differ from pretraining (BERT paper: lr 2e-5..5e-5, few epochs).
    lr: float = field(5e-5, help="peak learning rate (after warmup)")
    warmup_steps: int = field(0, help="warmup steps; 0 uses --warmup-ratio")
    max_steps: int = field(1_000_000, help="cap on optimizer steps; the length comes from --epochs")
    batch_size: int = field(16, help="examples per worker per micro-batch")
    eval_every: int = field(0, help="steps between evaluations (0: at the end of each epoch)")
    checkpoint_every: int = field(0, help="steps between checkpoints (0: each epoch)")
    eval_batches: int = field(0, help="validation batches per evaluation (0: the whole eval file)")

    def __post_init__(self) -> None:
        LoopSettings.__post_init__(self)
        TrackingSettings.__post_init__(self)
        check(bool(self.base.strip()), "base", "give the model to fine-tune (--base MODEL)")
        check(bool(self.train.strip()), "train", "give the training file (--train FILE)")
        check(self.epochs > 0, "epochs", "must be positive")
        check(16 <= self.max_seq_len <= 512, "max_seq_len", "must be between 16 and 512")
        check(self.doc_stride >= 1, "doc_stride", "must be at least 1")
        # A longer question than fits is cut to leave room for the context (qa features).
        check(self.max_query_len >= 1, "max_query_len", "must be at least 1")
        check(self.max_answer_length >= 1 and self.n_best >= 1, "max_answer_length/n_best",
              "must be at least 1")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.labels is None or len(set(self.labels)) == len(self.labels) >= 2, "labels",
              "needs at least two distinct names")
