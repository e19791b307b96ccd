"""Pretraining: masked LM + NSP/SOP on a prepared dataset, on the one Ray Train loop.

`run_pretrain(config)`:
1. Read the dataset's manifest and tokenizer; build or resolve the model (`--model-size`,
   `--model-config` or `--init`) and check it fits the data before anything starts: the
   vocabulary (size, and the exact tokenizer when the init model carries one), the
   position table against the dataset's sequence length, segment ids for pairs. Also
   checked first: the MLflow server answers, `--init` exists and is pinned once
   (workflows.tracking.pin_model: `models:/X@latest` becomes the exact `models:/X/7`, a
   folder its path and sha256), the `--storage-path` is usable (engine.check_storage).
   Exactly the pinned init model and the tokenizer reach the workers through the Ray
   object store (workflows/transfer.py); the driver's download of a registered init
   model is deleted before training starts.
2. Open the MLflow run: a new one, or, when the run folder already holds checkpoints
   (the driver died, the same command runs again), the run of that name, reopened, so
   the curves continue. Params (the whole config; `init` the pinned reference), tags
   (bertflow version, git commit, the init model's lineage), the dataset as a run input
   (manifest fingerprint and path). A resumed run keeps the init model its run recorded
   (its checkpoints continue from that), even if `--init` names another version now.
3. Train with `workflows.training.engine.run_training` (rank 0 logs metrics every
   `log_every`).
4. Log the final model (HF folder + tokenizer + bertflow.json; downloaded first when the
   run folder is on object storage) as an MLflow pyfunc and,
   with `register_as`, register it as a new version whose tags name the run, the dataset
   fingerprint and the exact base model (`models:/X/7`, and the reference given). First
   the metrics rank 0 could not send are delivered (workflows.tracking_outbox); with the
   server unreachable past `--tracker-wait-s`, the model stays in the run folder and
   `result.pending` is the command that registers it later
   (workflows.deferred_registration).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bert_core.config_io import BertflowError
from workflows.config import PretrainConfig, flat_dict
from workflows.model_folder import PRETRAINING_HEAD, save_model_folder

log = logging.getLogger(__name__)


class PretrainError(BertflowError):
    """Pretraining cannot start: the data, model or run does not fit; the message says how."""


EVAL_SUMS = ("mlm_loss", "mlm_correct", "mlm_count", "nsp_loss", "nsp_correct", "nsp_count")


@dataclass
class PretrainTask:
    """The TrainTask of pretraining (picklable: plain values, no tokenizer object).

    With MLM-only data (`objective="mlm"`) the model is `BertForMaskedLM`: no sentence
    head and no pooler, which would get no gradient and make DDP fail on the second step.
    """

    model_config: dict[str, Any]          # HF config.json of a fresh model
    init_dir: Any                         # or start from this HF folder (a ShippedFolder
                                          # from the driver, or a local path in tests)
    tokenizer_dir: Any                    # the dataset's tokenizer (saved with the model;
                                          # a ShippedFolder or a local path)
    pad_id: int
    masking: Any = None                   # data_prep MaskingSpec for dynamic masking
    meta: dict[str, Any] = field(default_factory=dict)  # bertflow.json of the saved model
    objective: str = "nsp"                # the dataset's: nsp, sop or mlm
    train_location: str | None = None     # the train split's Parquet parts (training/rows.py)
    train_files: list[dict[str, Any]] | None = None  # their rows and sizes, from the manifest
    val_rows: Any = None                  # the val split (training/rows.py SplitRows)

    @property
    def head(self) -> type[nn.Module]:
        """The model class trained: the MLM + sentence head, or MLM alone."""
        from bert_core import BertForMaskedLM

        return BertForMaskedLM if self.objective == "mlm" else PRETRAINING_HEAD

    def build_model(self) -> nn.Module:
        from bert_core import BertConfig

        from workflows.transfer import local_folder

        if self.init_dir:
            model = self.head.from_pretrained(local_folder(self.init_dir))
        else:
            model = self.head(BertConfig.from_hf_dict(self.model_config))
        if self.masking is not None:
            # Compiled, the MLM decoder reads this many positions per row (dynamic masking
            # never masks more); without it, every position (static masks: no bound known).
            model.max_predictions = self.masking.max_predictions
        return model

    def load_model(self, model_dir: Path) -> nn.Module:
        return self.head.from_pretrained(model_dir, strict=True)

    def collate(self, batch: dict[str, np.ndarray],
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from data_prep.collate import collate_pretraining

        arrays = collate_pretraining(batch, self.pad_id, self.masking, rng)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    @staticmethod
    def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
        """Masked tokens of a collated batch, counted on its CPU copy: what the MLM loss
        of a step is averaged over (see StepRunner.begin_cycle)."""
        return int(np.count_nonzero(batch["labels"].numpy() != -100))

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                     tokens_per_micro: torch.Tensor | float | None = None,
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
        """With `tokens_per_micro` (masked tokens of the step's global batch / its
        micro-batches) the MLM term is this micro-batch's sum of token losses divided by
        it, so that every masked token of the step weighs the same; NSP stays a mean over
        the micro-batch's pairs (every micro-batch has the same number)."""
        if self.objective == "mlm":
            out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        labels=batch["labels"])
            mlm_loss, loss = out.loss, _token_weighted(out.loss, out.mlm_count, tokens_per_micro)
            return loss, {"mlm_loss": mlm_loss.detach(), "mlm_correct": out.mlm_correct,
                          "mlm_count": out.mlm_count}
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    labels=batch["labels"], next_sentence_label=batch.get("next_sentence_label"))
        metrics: dict[str, Any] = {"mlm_loss": out.mlm_loss.detach(),
                                   "mlm_correct": out.mlm_correct, "mlm_count": out.mlm_count}
        loss = _token_weighted(out.mlm_loss, out.mlm_count, tokens_per_micro)
        if out.nsp_loss is not None:
            metrics.update(nsp_loss=out.nsp_loss.detach(), nsp_correct=out.nsp_correct,
                           nsp_count=float(batch["input_ids"].shape[0]))
            loss = loss + out.nsp_loss
        return loss, metrics

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """MLM loss (per masked token) and accuracy, NSP/SOP loss and accuracy."""
        return self.eval_metrics(self.eval_sums(model, batches))

    def eval_sums(self, model: nn.Module, batches) -> dict[str, float]:
        """Sums over `batches` from which `eval_metrics` computes the metrics: sums of
        several workers' shards add up to the sums of the whole set (the loop all-reduces
        them). Always the same keys, so every rank reduces the same vector."""
        sums = dict.fromkeys(EVAL_SUMS, 0.0)
        for batch in batches:
            _, m = self.compute_loss(model, batch)
            count = float(m["mlm_count"])
            sums["mlm_loss"] += float(m["mlm_loss"]) * count
            sums["mlm_correct"] += float(m["mlm_correct"])
            sums["mlm_count"] += count
            if "nsp_loss" in m:
                n = m["nsp_count"]
                sums["nsp_loss"] += float(m["nsp_loss"]) * n
                sums["nsp_correct"] += float(m["nsp_correct"])
                sums["nsp_count"] += n
        return sums

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        """The metrics of (all-reduced) `eval_sums`."""
        out = {}
        if sums["mlm_count"]:
            out["mlm_loss"] = sums["mlm_loss"] / sums["mlm_count"]
            out["mlm_acc"] = sums["mlm_correct"] / sums["mlm_count"]
        if sums["nsp_count"]:
            out["nsp_loss"] = sums["nsp_loss"] / sums["nsp_count"]
            out["nsp_acc"] = sums["nsp_correct"] / sums["nsp_count"]
        return out

    def save_model(self, model: nn.Module, model_dir: Path) -> None:
        """HF folder + tokenizer + bertflow.json: everything serving needs."""
        from workflows.transfer import local_folder

        save_model_folder(model, model_dir, local_folder(self.tokenizer_dir), self.meta)


def _token_weighted(mean_loss: torch.Tensor, count: torch.Tensor,
                    tokens_per_micro: torch.Tensor | float | None) -> torch.Tensor:
    """A micro-batch's mean token loss as its sum over `tokens_per_micro` (unchanged
    without): the micro-batch counts as many tokens as it has, not as one."""
    if tokens_per_micro is None:
        return mean_loss
    return mean_loss * count / tokens_per_micro


@dataclass
class PretrainResult:
    """What `run_pretrain` returns."""

    run_id: str
    model_dir: Path | str          # HF folder of the final checkpoint (a URI on remote storage)
    model_uri: str                 # the logged MLflow model
    model_version: str | None      # registered version (with register_as)
    step: int
    start_step: int                # > 0 when the last worker group resumed
    metrics: dict[str, Any]
    checkpoint_dir: Path | str     # Paths on local storage, URIs on remote storage
    run_dir: Path | str
    pending: str | None = None     # the command that registers it later (tracker was down)


def _model_config(cfg: PretrainConfig, tokenizer: Any, manifest: Any,
                  init_dir: Path | None) -> dict[str, Any]:
    """The HF config of the model to train, checked against the dataset."""
    from bert_core import BertConfig
    from data_prep.tokenizer import WordPieceTokenizer

    data_tok = f"the dataset's tokenizer ({str(cfg.data).rstrip('/')}/tokenizer)"
    if init_dir is not None:
        source = f"--init {cfg.init} ({init_dir / 'config.json'})"
        config = BertConfig.from_hf_dict(json.loads((init_dir / "config.json").read_text()),
                                         str(init_dir / "config.json"))
        if (init_dir / "vocab.txt").is_file():
            init_tok = WordPieceTokenizer.from_dir(init_dir)
            if init_tok.fingerprint() != tokenizer.fingerprint():
                raise PretrainError(
                    f"{source}: its tokenizer ({init_tok.vocab_size} tokens, lowercase="
                    f"{init_tok.lowercase}) differs from {data_tok} ({tokenizer.vocab_size} "
                    f"tokens, lowercase={tokenizer.lowercase}); prepare the data with "
                    f"--vocab {init_dir}")
    elif cfg.model_config:
        source = f"--model-config {cfg.model_config}"
        path = Path(cfg.model_config)
        if not path.is_file():
            raise PretrainError(f"{source}: file not found")
        data = json.loads(path.read_text())
        data.setdefault("vocab_size", tokenizer.vocab_size)
        config = BertConfig.from_hf_dict(data, str(path))
    else:
        source = f"--model-size {cfg.model_size}"
        config = BertConfig.preset(cfg.model_size, vocab_size=tokenizer.vocab_size)
    if config.vocab_size != tokenizer.vocab_size:
        raise PretrainError(
            f"{source}: the model has vocab_size {config.vocab_size} but {data_tok} has "
            f"{tokenizer.vocab_size} tokens; the ids would not match. Prepare the data with "
            f"the model's vocab.txt, or use a model config with vocab_size "
            f"{tokenizer.vocab_size}")
    seq_len = int(manifest.config.get("max_seq_len", 0))
    if seq_len > config.max_position_embeddings:
        raise PretrainError(
            f"{source}: the model takes at most {config.max_position_embeddings} positions "
            f"but the dataset {cfg.data} has sequences of {seq_len}")
    if manifest.config.get("objective", "nsp") != "mlm" and config.type_vocab_size < 2:
        raise PretrainError(f"{source}: type_vocab_size {config.type_vocab_size} cannot "
                            f"hold the two segments of the dataset's sentence pairs")
    mlm_only = manifest.config.get("objective", "nsp") == "mlm"
    return config.to_hf_dict("BertForMaskedLM" if mlm_only else "BertForPreTraining")


def _masking(manifest: Any, tokenizer: Any) -> Any:
    """The dynamic-masking spec of a dataset prepared with `--masking dynamic`, else None."""
    from data_prep.masking import MaskingSpec

    c = manifest.config
    if c.get("masking", "static") != "dynamic":
        return None
    return MaskingSpec.from_tokenizer(
        tokenizer, masked_lm_prob=float(c.get("masked_lm_prob", 0.15)),
        max_predictions=int(c.get("max_predictions_per_seq", 20)),
        whole_word=bool(c.get("whole_word_mask", False)))


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain as described in the module docstring; returns the run and model."""
    from data_prep.manifest import open_dataset
    from data_prep.ray_env import init_ray
    from data_prep.tokenizer import WordPieceTokenizer
    from data_prep.storage import public_uri
    from workflows import tracking as T
    from workflows.deferred_registration import (PendingRegistration, finish_run,
                                                 register_command)
    from workflows.training.contracts import RunTracking
    from workflows.training.engine import check_storage, run_folder, run_training
    from workflows.training.rows import SplitRows
    from workflows.transfer import check_model_ref, ship_folder, ship_model_folder

    cfg = config
    cfg.validate_for_run()
    data, manifest = open_dataset(cfg.data, "--data")  # a path or URI with a manifest
    data_dir = data.uri
    if manifest.kind != "pretraining":
        raise PretrainError(f"{data_dir}: a {manifest.kind!r} dataset, not a pretraining one; "
                            f"prepare it with `bertflow prep`")
    tokenizer = WordPieceTokenizer.from_dir(data_dir)
    uri = T.resolve_tracking_uri(cfg.tracking.tracking_uri)
    T.check_tracking_store(uri)
    pinned = T.pin_model(cfg.init, uri) if cfg.init else None  # once, before Ray starts
    if cfg.init:
        check_model_ref(cfg.init)  # a broken or hostile folder fails here, not in a worker
    loop = cfg.loop
    init_ray(cfg.address)
    check_storage(loop, uri)
    # What the workers open travels through the object store (workflows/transfer.py):
    # the init model (its driver download is deleted at once) and the tokenizer.
    with tempfile.TemporaryDirectory(prefix="bertflow-init-") as tmp:
        init_dir = pinned.fetch(tmp) if pinned else None  # exactly the pinned bytes
        model_config = _model_config(cfg, tokenizer, manifest, init_dir)
        init = ship_model_folder(init_dir, origin=pinned.uri) if pinned else None
        shipped_tokenizer = ship_folder(tokenizer.save(Path(tmp) / "tokenizer"),
                                        origin=f"{cfg.data} tokenizer")

    run = run_folder(loop, cfg.run_name)
    trained = run.result()
    if trained is not None:
        # Finished training; only if the driver died before logging the model, do that now.
        found = T.find_run(T.ensure_experiment(cfg.tracking.experiment, uri), cfg.run_name, uri)
        if found is None or found.data.tags.get(T.TAG_MODEL_URI):
            raise PretrainError(f"run {cfg.run_name!r} already finished ({run.where}); choose "
                                f"a new --run-name, or delete that folder to train it again")
    resuming = run.latest_checkpoint() is not None
    lineage = {T.TAG_DATASET_FINGERPRINT: manifest.fingerprint,
               T.TAG_DATASET_PATH: str(data_dir)}
    if pinned:
        lineage.update(pinned.lineage)
    run_id = T.open_run(
        uri, cfg.tracking.experiment, cfg.run_name, tags={**lineage, T.TAG_TASK: "pretraining"},
        params={**flat_dict(cfg), **(pinned.params("init") if pinned else {}),
                "global_batch_size": loop.global_batch},  # effective; rank 0 logs it too
        resume=resuming,
        inputs=[T.DatasetInput(data_dir, manifest, "train", "dataset/manifest.json")])
    if resuming:  # the checkpoints continue from the model the run pinned when it started
        recorded = T.started_from(lineage, T.client(uri).get_run(run_id).data.tags)
        if recorded.get(T.TAG_BASE_MODEL) != lineage.get(T.TAG_BASE_MODEL):
            log.warning("run %s continues its checkpoints, trained from %s as its run "
                        "records, not from what --init names now (%s)", cfg.run_name,
                        recorded.get(T.TAG_BASE_MODEL, "a new model"),
                        pinned.uri if pinned else "none")
        lineage = recorded

    init_ray(cfg.address)
    splits = {s: data.join(s).uri for s in ("train", "val")
              if int(manifest.splits.get(s, {}).get("instances", 0)) > 0}
    if "train" not in splits:
        raise PretrainError(f"{data_dir}: the train split is empty; prepare more text")
    # Workers read both splits themselves, with the credentials of the job's runtime
    # environment (init_ray): `train` in the canonical order (reshuffled per epoch,
    # seekable on resume), `val` in file order (no Ray Data pass per evaluation).
    val_rows = (SplitRows(splits["val"], manifest.splits["val"].get("files"), prefix="val/")
                if "val" in splits else None)
    task = PretrainTask(
        model_config=model_config, init_dir=init,
        tokenizer_dir=shipped_tokenizer, pad_id=tokenizer.pad_id,
        masking=_masking(manifest, tokenizer), objective=manifest.config.get("objective", "nsp"),
        train_location=splits["train"], train_files=manifest.splits["train"].get("files"),
        val_rows=val_rows,
        meta={"task": "pretraining", "objective": manifest.config.get("objective", "nsp"),
              "max_seq_len": manifest.config.get("max_seq_len"), "run_id": run_id,
              "dataset_fingerprint": manifest.fingerprint,
              "base_model": lineage.get(T.TAG_BASE_MODEL)})
    log.info("pretraining %s (%s) on %s: %d train instances, %d steps", cfg.run_name,
             "resuming" if resuming else "new", data_dir,
             manifest.splits["train"]["instances"], loop.max_steps)
    result = trained
    if result is None:
        try:
            result = run_training(task, loop, run=run,
                                  tracking=RunTracking(uri, run_id, cfg.tracking.log_system_metrics))
        except BaseException:
            T.fail_run(run_id, uri)  # rerunning the command resumes it from its checkpoint
            raise

    # The metrics rank 0 could not send, the model, its registration: or, with the server
    # unreachable past --tracker-wait-s, all of it left for `bertflow registry register`.
    pending = PendingRegistration(
        run_id=run_id, task="pretraining", model_dir=str(result.model_dir), tags=lineage,
        version_tags={T.TAG_RUN_NAME: cfg.run_name}, register_as=cfg.tracking.register_as,
        metrics={k: v for k, v in result.metrics.items() if k.startswith("val_")},
        tracking_uri=public_uri(uri))
    model_uri, version = finish_run(run, pending, uri, cfg.tracking.tracker_wait_s)
    return PretrainResult(run_id=run_id, model_dir=result.model_dir, model_uri=model_uri,
                          model_version=version, step=result.step, start_step=result.start_step,
                          metrics=result.metrics, checkpoint_dir=result.checkpoint_dir,
                          run_dir=result.run_dir,
                          pending=None if model_uri else register_command(
                              run.where, cfg.tracking.register_as))
