"""`bertflow sweep`: the search space, the ranking on means over restarts, and real sweeps
on Ray Tune with a real MLflow store: ASHA stopping the poor trials of a 2 lrs x 2 seeds
sweep (parent and child runs, the registered winner and its lineage, the stopped trials'
CPUs given back), and an Optuna sweep whose driver is killed and rerun (finished trials
kept, the unfinished one continued from its checkpoint, one parent run).

The Ray tests are kept to the least that proves each point (96 training rows, 2 epochs of
12 steps, one trial at a time): each trial costs a Tune actor, a Train controller and a
worker process, which is most of its time on 2 cores."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetune_data as D
import services
from bert_core.config_io import ConfigError


def _sweep_config(tmp: Path, **kw):
    from workflows.config import SweepConfig, config_from_mapping

    settings = dict(task="seq-cls", base=str(tmp / "base"), train=str(tmp / "train.csv"),
                    eval=str(tmp / "eval.jsonl"), max_seq_len=32, batch_size=16, epochs=2,
                    tracking_uri=f"sqlite:///{tmp / 'mlruns.db'}", storage_path=str(tmp / "runs"),
                    data_dir=str(tmp / "data"), log_system_metrics=False, log_every=5)
    settings.update(kw)
    return config_from_mapping(SweepConfig, settings)


# ---------------------------------------------------------------- no Ray


def test_paper_grid_is_the_18_points_of_the_bert_paper(tmp_path):
    from workflows.training.sweep_space import check_space, expand_points, load_space

    cfg = _sweep_config(tmp_path)
    points = expand_points(check_space(load_space("paper"), cfg, "paper"), "grid", 0, 0)
    assert len(points) == 18
    assert {(p["batch_size"], p["lr"], p["epochs"]) for p in points} == {
        (b, lr, e) for b in (16, 32) for lr in (5e-5, 3e-5, 2e-5) for e in (2, 3, 4)}


def test_space_file_is_checked_against_the_finetune_fields(tmp_path):
    from workflows.training.sweep_space import check_space, expand_points, load_space

    cfg = _sweep_config(tmp_path, search="random", num_samples=5)
    space_file = tmp_path / "space.yaml"
    space_file.write_text("lr: {loguniform: [1.0e-5, 1.0e-4]}\nlearning_rate: [1]\n")
    with pytest.raises(ConfigError) as err:
        check_space(load_space(str(space_file)), cfg, str(space_file))
    assert "'learning_rate'" in str(err.value) and "lr" in str(err.value).split("vary:")[1]
    with pytest.raises(ConfigError, match="fix the data"):
        check_space({"max_seq_len": [64]}, cfg, "space")
    with pytest.raises(ConfigError, match="batch_size=0"):
        check_space({"batch_size": [16, 0]}, cfg, "space")
    with pytest.raises(ConfigError, match="cannot be a grid"):
        check_space({"lr": {"loguniform": [1e-5, 1e-4]}}, _sweep_config(tmp_path), "space")
    space = check_space({"lr": {"loguniform": [1e-5, 1e-4]}, "batch_size": [16, 32]}, cfg, "s")
    points = expand_points(space, "random", 5, seed=3)
    assert points == expand_points(space, "random", 5, seed=3)  # the sweep's seed decides
    assert len(points) == 5 and all(1e-5 <= p["lr"] <= 1e-4 for p in points)
    space_file.write_text("lr: {loguniform: [1e-5, 1e-4]}\nbatch_size: [16, 32]\n")
    space = check_space(load_space(str(space_file)), cfg, "s")  # YAML reads 1e-5 as a string
    assert space == {"lr": {"loguniform": [1e-5, 1e-4]}, "batch_size": [16, 32]}
    assert check_space({"lr": ["5e-5", 3e-5]}, _sweep_config(tmp_path), "s") == {"lr": [5e-5, 3e-5]}


def test_winner_is_the_best_mean_over_restarts_not_the_luckiest_seed():
    from workflows.training.sweep_ranking import TrialRecord, rank_points

    def trial(lr, seed, value, status="done"):
        return TrialRecord(f"t{lr}{seed}", "", {"lr": lr}, seed, status, value, 2, 10.0)

    ranking = rank_points([trial(1, 0, 0.95), trial(1, 1, 0.55),   # lucky once
                           trial(2, 0, 0.85), trial(2, 1, 0.83),   # steady
                           trial(3, 0, 0.99), trial(3, 1, 0.50, "stopped")], "max")
    assert [p.point["lr"] for p in ranking] == [2, 1, 3]  # incomplete points rank last
    assert ranking[0].mean == pytest.approx(0.84) and ranking[0].std == pytest.approx(0.01414, abs=1e-4)
    assert [p.point["lr"] for p in rank_points(ranking[0].trials + ranking[1].trials, "min")] == [1, 2]


def test_reported_checkpoint_paths_become_uris_of_the_trials_store():
    """Ray Train reports a checkpoint by its path on the storage filesystem: on S3 that is
    `bucket/key`, which read as a local path would name a folder that does not exist."""
    from data_prep.storage import Location
    from workflows.run_folder import RunFolder
    from workflows.training.sweep_trials import reuse_trial_actors

    s3 = RunFolder(storage_path="s3://bkt/runs", name="s", uri="s3://bkt/runs/s")
    on_s3 = Location(None, "bkt/runs/s", s3.uri)  # what s3.location holds, without a client
    assert s3.where_of(on_s3.with_path("bkt/runs/s/trials/t1/checkpoint_000001")) \
        == "s3://bkt/runs/s/trials/t1/checkpoint_000001"
    local = RunFolder.of("/tmp/runs", "s")
    assert local.where_of(local.location.with_path("/tmp/runs/s/trials/t1/c")) \
        == Path("/tmp/runs/s/trials/t1/c")
    # An ASHA-stopped trial's thread is still in its Train run: its actor cannot be reused.
    assert not reuse_trial_actors(_sweep_config(Path("/tmp"), scheduler="asha"))
    assert reuse_trial_actors(_sweep_config(Path("/tmp"), scheduler="none"))


# ---------------------------------------------------------------- real Ray Tune + MLflow

TRAIN_ROWS = 96
STEPS_PER_EPOCH = 12  # batches of 8: enough updates for the good lr to lead after epoch 1


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:
    """Train/eval files and one tokenized-data cache shared by the Ray tests (the second
    sweep, and the rerun of a killed one, reuse the tokenized datasets)."""
    root = tmp_path_factory.mktemp("sweep-data")
    D.write_sentiment(root / "train.csv", TRAIN_ROWS, seed=1)
    D.write_sentiment(root / "eval.jsonl", 48, seed=2, fmt="jsonl")
    return root


def _ray_sweep_config(tmp: Path, data: Path, base: Path, **kw):
    return _sweep_config(tmp, base=str(base), train=str(data / "train.csv"),
                         eval=str(data / "eval.jsonl"), data_dir=str(data / "tokenized"),
                         labels=["neg", "pos"], max_concurrent=1, batch_size=8, **kw)


def _children(c, experiment: str, parent_id: str) -> tuple[list, list]:
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    return runs, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_the_poor_lr_early_and_the_best_mean_is_registered(
        tmp_path, sweep_data, minilm_dir, ray_local, capsys):
    """2 lrs x 2 seeds under ASHA, one trial at a time: both trials of the lr that cannot
    learn are stopped after their first epoch (the rung), their CPUs come back (the next
    trials start; nothing is left reserved), the lr that learns wins on its mean, and the
    MLflow store holds 1 parent + 4 child runs with params and per-epoch metrics, only the
    winner's model, registered with the sweep in its lineage."""
    from ray.util import placement_group_table

    from workflows import tracking as T
    from workflows.ops.registry import render_model, show_model
    from workflows.training.sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text("lr: [2.0e-4, 1.0e-8]  # the second one cannot learn\n")
    cfg = _ray_sweep_config(tmp_path, sweep_data, minilm_dir, grid=str(space), restarts=2,
                            scheduler="asha", grace_period=1, reduction_factor=2,
                            run_name="lr-sweep", register_as="sweep-best")
    result = run_sweep(cfg)

    out = capsys.readouterr().out
    assert out.count("val_accuracy=") == 4  # one line per trial
    good = [t for t in result.trials if t.point["lr"] == 2e-4]
    poor = [t for t in result.trials if t.point["lr"] == 1e-8]
    # Sequential trials: the first at the rung runs on; each poor one trails the median.
    assert [(t.status, t.epochs) for t in poor] == [("stopped", 1)] * 2
    assert [(t.status, t.epochs) for t in good] == [("done", 2)] * 2
    assert out.count(" stopped ") == 2
    assert result.ranking[0].point == {"lr": 2e-4} and result.ranking[0].complete
    assert result.winner in good and result.winner.value == max(t.value for t in good)
    assert result.ranking[0].mean > result.ranking[1].mean
    deadline = time.monotonic() + 30  # the stopped trials' worker groups were released
    while any(g["state"] != "REMOVED" for g in placement_group_table().values()):
        assert time.monotonic() < deadline, placement_group_table()
        time.sleep(0.5)

    c = T.client(cfg.tracking.tracking_uri)
    runs, children = _children(c, cfg.tracking.experiment, result.run_id)
    assert len(runs) == 5 and len(children) == 4
    status = {r.info.run_id: r.info.status for r in children}
    for t in result.trials:
        assert status[t.run_id] == ("FINISHED" if t.status == "done" else "KILLED")
    for child in children:
        assert child.data.params["sweep.lr"] in ("0.0002", "1e-08")
        assert child.data.params["seed"] == child.data.params["sweep.seed"]
        history = c.get_metric_history(child.info.run_id, "val_accuracy")
        if child.info.status == "FINISHED":
            assert len(history) == 3  # before training, then after each of the 2 epochs
        else:
            assert len(history) >= 2
    with_model = [r.info.run_id for r in children if T.TAG_MODEL_URI in r.data.tags]
    assert with_model == [result.winner.run_id]  # no model for the other trials
    table = json.loads(Path(c.download_artifacts(result.run_id, "sweep/trials.json",
                                                 str(tmp_path))).read_text())
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)
    parent = c.get_run(result.run_id)
    assert parent.data.metrics["best_val_accuracy_mean"] == pytest.approx(result.ranking[0].mean)
    assert parent.data.metrics["trials_stopped"] == 2

    info = show_model(f"sweep-best/{result.model_version}", cfg.tracking.tracking_uri)
    assert info["tags"][T.TAG_SWEEP_RUN] == result.run_id
    assert info["run_id"] == result.winner.run_id
    assert f"lr-sweep  (run {result.run_id})" in render_model(info)


@pytest.mark.ray
def test_a_trial_that_ended_before_its_driver_died_gives_optuna_its_result(tmp_path,
                                                                           ray_local):
    """A driver killed after a trial wrote its result but before Tune saved the trial as
    ended reruns it on resume: it trains nothing, but it reports the kept final metrics, or
    Optuna fails the sweep ("did not include the specified metric")."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from workflows.run_folder import TrainResult
    from workflows.training.sweep_trials import quiet_tune_console, report_finished_trial

    done = TrainResult(run_name="t", run_dir=tmp_path, checkpoint_dir=tmp_path,
                       model_dir=tmp_path, step=24,
                       metrics={"val_accuracy": 0.75, "val_loss": 0.5, "rank": "0"})
    def trainable(config):  # as train_trial: before any Train callback (and its queue)
        report_finished_trial(done)

    quiet_tune_console()
    grid = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.25}),
        param_space={"lr": tune.loguniform(1e-4, 3e-4)},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max",
                                    search_alg=OptunaSearch(), num_samples=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="ended",
                                  verbose=0)).fit()
    assert not grid.errors
    assert {k: grid[0].metrics[k] for k in ("val_accuracy", "val_loss", "step")} \
        == {"val_accuracy": 0.75, "val_loss": 0.5, "step": 24}
    assert "rank" not in grid[0].metrics  # Tune gets numbers only


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_sweep_resumes_after_its_driver_is_killed(tmp_path, sweep_data, minilm_dir,
                                                         ray_local):
    """`bertflow sweep --search optuna` in a subprocess, SIGKILLed once one trial has
    finished and the next has checkpointed its first epoch; rerunning the same sweep name
    on the same storage: the finished trial is not trained again, the unfinished one
    continues from its checkpoint, and MLflow ends with one parent run holding one child
    per trial."""
    from workflows import tracking as T
    from workflows.training.engine import finished_run
    from workflows.training.sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 3.0e-4]}\n")
    settings = dict(grid=str(space), search="optuna", num_samples=2, run_name="resumed",
                    register_as="resumed-best")
    cfg = _ray_sweep_config(tmp_path, sweep_data, minilm_dir, **settings)
    args = ["--task", "seq-cls", "--base", cfg.base, "--train", cfg.train, "--eval", cfg.eval,
            "--labels", "neg", "pos", "--max-seq-len", "32", "--batch-size", "8",
            "--epochs", "2", "--max-concurrent", "1", "--log-every", "5",
            "--no-log-system-metrics", "--tracking-uri", cfg.tracking.tracking_uri,
            "--storage-path", cfg.loop.storage_path, "--data-dir", cfg.data_dir,
            "--grid", str(space), "--search", "optuna", "--num-samples", "2",
            "--run-name", "resumed", "--register-as", "resumed-best"]
    log = tmp_path / "driver.log"
    with log.open("wb") as out:  # its own session: the test can clean up all it started
        proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "sweep", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    trials = Path(cfg.loop.storage_path) / "resumed" / "trials"
    try:
        done_dir, unfinished_dir = services.wait_for_trial_kill_point(
            lambda: trials.glob("*") if trials.is_dir() else [], proc, log)
    finally:
        services.kill_driver(proc)
    first_result = (done_dir / "bertflow_result.json").read_text()
    assert not (unfinished_dir / "bertflow_result.json").exists()

    result = run_sweep(cfg)

    assert result.resumed and len(result.trials) == 2
    assert all(t.status == "done" and 1e-4 <= t.point["lr"] <= 3e-4 for t in result.trials)
    assert len({t.point["lr"] for t in result.trials}) == 2  # Optuna chose two points
    by_dir = {t.run_name: t for t in result.trials}
    assert set(by_dir) == {done_dir.name, unfinished_dir.name}
    assert (done_dir / "bertflow_result.json").read_text() == first_result  # not rerun
    loop = cfg.loop
    continued = finished_run(dataclasses.replace(loop, storage_path=str(unfinished_dir.parent)),
                             unfinished_dir.name)
    assert continued.start_step == STEPS_PER_EPOCH  # from its epoch-1 checkpoint

    c = T.client(cfg.tracking.tracking_uri)
    runs, children = _children(c, cfg.tracking.experiment, result.run_id)
    assert len(runs) == 3 and len(children) == 2  # one parent, no duplicate child
    assert sorted(r.data.tags[T.TAG_RUN_NAME] for r in children) == sorted(by_dir)
    steps = {r.data.tags[T.TAG_RUN_NAME]: [m.step for m in c.get_metric_history(
        r.info.run_id, "val_accuracy")] for r in children}
    e = STEPS_PER_EPOCH  # the finished trial was not logged twice:
    assert steps[done_dir.name] == [0, e, 2 * e]
    assert max(steps[unfinished_dir.name]) == 2 * e
    assert result.model_version == "1"
