"""`bertflow adapt BASE --corpus PATH... --suite FILE`: did continued (domain-adaptive)
pretraining help? Ordinary runs of the verbs it is made of:

1. prep      the corpus with BASE's own tokenizer (`ops.datasets.prepare_dataset`, as
             `bertflow prep --vocab models:/BASE` does), masked-LM instances by default
2. pretrain  BASE further on it (`pretrain.run_pretrain` with `--init BASE`), registered as
             a new model whose lineage names BASE's exact version and the dataset
3. eval      BASE and the adapted model on the suite in one evaluation (`run.run_eval`):
             the same tasks, grid and seeds for both
4. compare   per task the adapted model's mean minus BASE's, the restart-noise rule and a
             one-line verdict (`scorecard.compare`, `scorecard.verdict`)

Rerunning the same command continues: the dataset is reused when up to date, a finished
pretraining run's registered version is found by its run name (not trained again), and
the evaluation resumes with its finished trials kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.config import AdaptConfig
from workflows.evaluation.run import EvalError
from workflows.evaluation.scorecard import Difference, Scorecard, compare, verdict

log = logging.getLogger(__name__)


@dataclass
class AdaptResult:
    """What `run_adapt` returns."""

    base: Scorecard
    adapted: Scorecard
    adapted_model: str                 # models:/NAME/VERSION of the adapted model
    dataset: str                       # the prepared corpus
    pretrain_run_id: str
    differences: list[Difference]
    verdict: str
    evaluation: str                    # the evaluation's name

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base.to_json(), "adapted": self.adapted.to_json(),
                "adapted_model": self.adapted_model, "dataset": self.dataset,
                "pretrain_run_id": self.pretrain_run_id, "evaluation": self.evaluation,
                "differences": {d.task: {"metric": d.metric, "diff": d.diff, "noise": d.noise,
                                         "beyond_noise": d.beyond_noise}
                                for d in self.differences},
                "verdict": self.verdict}


def _label(pin: Any) -> str:
    if pin.name:
        return pin.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(pin.uri).name) or "model"


def run_adapt(config: AdaptConfig) -> AdaptResult:
    """Prep, pretrain, register, evaluate both, compare; see the module doc."""
    from data_prep.config import PrepConfig
    from workflows import tracking as T
    from workflows.config import (EvalConfig, LoopSettings, PretrainConfig,
                                  TrackingSettings)
    from workflows.evaluation.run import run_eval
    from workflows.evaluation.suite import load_suite
    from workflows.ops.datasets import prepare_dataset
    from workflows.training.pretrain import run_pretrain

    cfg = config
    uri = T.resolve_tracking_uri(cfg.tracking_uri)
    T.check_tracking_store(uri)
    pin = T.pin_model(cfg.base, uri)  # once: both prep and pretrain use this exact version
    overrides = {**cfg.overrides, "max_seq_len": cfg.max_seq_len, "seed": cfg.seed,
                 "tracking_uri": uri, "experiment": cfg.experiment}
    for key in ("address", "storage_path", "epochs"):
        if getattr(cfg, key) is not None:
            overrides[key] = getattr(cfg, key)
    # The suite is read (and every task checked) before anything is trained.
    suite = load_suite(cfg.suite, data_dir=cfg.data_dir, overrides=overrides,
                       restarts=cfg.restarts, grid=cfg.grid)
    label = _label(pin)
    vocab = pin.uri if pin.version is not None else str(Path(pin.uri) / "vocab.txt")
    dataset = str(Path(cfg.output) / f"{label}-{cfg.objective}{cfg.max_seq_len}")
    print(f"adapt 1/3: prep {', '.join(cfg.corpus)} with {pin.uri}'s tokenizer -> {dataset}",
          flush=True)
    manifest = prepare_dataset(PrepConfig(
        input=list(cfg.corpus), output=dataset, vocab=vocab, tracking_uri=uri,
        max_seq_len=cfg.max_seq_len, objective=cfg.objective, seed=cfg.seed,
        address=cfg.address))
    register_as = cfg.register_as or f"{label}-adapted"
    digest = hashlib.sha256(json.dumps(
        [pin.uri, manifest.fingerprint, cfg.max_steps, cfg.lr, cfg.pretrain_batch_size,
         cfg.seed]).encode()).hexdigest()[:10]
    run_name = cfg.run_name or f"adapt-{label}-{digest}"
    adapted = _registered_by(run_name, register_as, cfg.experiment, uri)
    if adapted is None:
        print(f"adapt 2/3: pretrain {pin.uri} for {cfg.max_steps} steps on it (run "
              f"{run_name})", flush=True)
        loop = LoopSettings(max_steps=cfg.max_steps, lr=cfg.lr,
                            batch_size=cfg.pretrain_batch_size,
                            warmup_steps=max(1, min(100, cfg.max_steps // 10)),
                            eval_every=cfg.max_steps, checkpoint_every=cfg.max_steps,
                            log_every=max(1, min(10, cfg.max_steps // 5)), seed=cfg.seed,
                            **({"storage_path": cfg.storage_path} if cfg.storage_path else {}))
        pre = run_pretrain(PretrainConfig(
            data=dataset, run_name=run_name, init=pin.uri, address=cfg.address, loop=loop,
            tracking=TrackingSettings(tracking_uri=uri, experiment=cfg.experiment,
                                      register_as=register_as)))
        if not pre.model_version:
            raise EvalError(f"pretraining run {run_name} did not register its model "
                            f"({pre.pending or 'see the log'}); register it, then rerun")
        adapted = f"models:/{register_as}/{pre.model_version}"
        run_id = pre.run_id
    else:
        print(f"adapt 2/3: {adapted} is run {run_name}'s model already; not training it "
              f"again", flush=True)
        run_id = T.get_model_version(adapted, uri).run_id or ""
    print(f"adapt 3/3: evaluate {pin.uri} and {adapted} on {suite.name}", flush=True)
    result = run_eval(EvalConfig(models=[pin.uri, adapted], suite=cfg.suite,
                                 data_dir=cfg.data_dir, restarts=cfg.restarts, grid=cfg.grid,
                                 max_concurrent=cfg.max_concurrent, overrides=overrides),
                      suite=suite)
    base_card, adapted_card = result.scorecards
    diffs = compare(base_card, adapted_card)
    return AdaptResult(base=base_card, adapted=adapted_card, adapted_model=adapted,
                       dataset=dataset, pretrain_run_id=run_id, differences=diffs,
                       verdict=verdict(diffs, "the base model", "the adapted model"),
                       evaluation=result.name)


def _registered_by(run_name: str, name: str, experiment: str, uri: str) -> str | None:
    """models:/NAME/VERSION registered from the finished run `run_name`, if any."""
    from workflows import tracking as T

    run = T.find_run(T.ensure_experiment(experiment, uri), run_name, uri)
    if run is None or not run.data.tags.get(T.TAG_MODEL_URI):
        return None
    versions = T.client(uri).search_model_versions(f"name = '{name}'")
    mine = [v for v in versions if v.run_id == run.info.run_id
            or (v.tags or {}).get(T.TAG_RUN_ID) == run.info.run_id]
    if not mine:
        return None
    return f"models:/{name}/{max(int(v.version) for v in mine)}"
