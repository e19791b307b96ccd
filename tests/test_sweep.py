"""`bertflow sweep`: the search space, the ranking on means over restarts, and one real
sweep on Ray Tune with a real MLflow store (parent and child runs, the registered winner
and its lineage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetune_data as D
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
    from workflows.training.sweep import check_space, expand_points, load_space

    cfg = _sweep_config(tmp_path)
    points = expand_points(check_space(load_space("paper"), cfg, "paper"), "grid", 0, 0)
    assert len(points) == 18
    assert {(p["batch_size"], p["lr"], p["epochs"]) for p in points} == {
        (b, lr, e) for b in (16, 32) for lr in (5e-5, 3e-5, 2e-5) for e in (2, 3, 4)}


def test_space_file_is_checked_against_the_finetune_fields(tmp_path):
    from workflows.training.sweep import check_space, expand_points, load_space

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


def test_winner_is_the_best_mean_over_restarts_not_the_luckiest_seed():
    from workflows.training.sweep import TrialRecord, rank_points

    def trial(lr, seed, value, status="done"):
        return TrialRecord(f"t{lr}{seed}", "", {"lr": lr}, seed, status, value, 2, 10.0)

    ranking = rank_points([trial(1, 0, 0.95), trial(1, 1, 0.55),   # lucky once
                           trial(2, 0, 0.85), trial(2, 1, 0.83),   # steady
                           trial(3, 0, 0.99), trial(3, 1, 0.50, "stopped")], "max")
    assert [p.point["lr"] for p in ranking] == [2, 1, 3]  # incomplete points rank last
    assert ranking[0].mean == pytest.approx(0.84) and ranking[0].std == pytest.approx(0.01414, abs=1e-4)
    assert [p.point["lr"] for p in rank_points(ranking[0].trials + ranking[1].trials, "min")] == [1, 2]


# ---------------------------------------------------------------- real Ray Tune + MLflow


def _data(tmp: Path) -> None:
    D.write_sentiment(tmp / "train.csv", 160, seed=1)
    D.write_sentiment(tmp / "eval.jsonl", 48, seed=2, fmt="jsonl")


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_every_trial_and_registers_the_best_mean(tmp_path, minilm_dir, ray_local,
                                                            capsys):
    """2 lrs x 2 seeds: a parent run, 4 child runs with params and per-epoch metrics, the
    lr that learns wins on its mean, only its best seed's model is logged and registered
    with the sweep in its lineage."""
    from workflows import tracking as T
    from workflows.ops.registry import render_model, show_model
    from workflows.training.sweep import run_sweep

    _data(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("lr: [1.0e-4, 1.0e-8]  # the second one cannot learn in 2 epochs\n")
    cfg = _sweep_config(tmp_path, base=str(minilm_dir), grid=str(space), restarts=2,
                        max_concurrent=1, run_name="lr-sweep", register_as="sweep-best",
                        labels=["neg", "pos"])
    result = run_sweep(cfg)

    out = capsys.readouterr().out
    assert out.count("trial ") >= 4 and "val_accuracy=" in out  # one line per trial
    assert [t.status for t in result.trials] == ["done"] * 4
    good = [t for t in result.trials if t.point["lr"] == 1e-4]
    assert result.ranking[0].point == {"lr": 1e-4} and result.ranking[0].complete
    assert result.winner in good and result.winner.value == max(t.value for t in good)

    c = T.client(cfg.tracking.tracking_uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == result.run_id][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert len(runs) == 5 and len(children) == 4
    for child in children:
        assert child.data.params["sweep.lr"] in ("0.0001", "1e-08")
        assert child.data.params["seed"] == child.data.params["sweep.seed"]
        history = c.get_metric_history(child.info.run_id, "val_accuracy")
        assert len(history) == 3  # before training, then after each of the 2 epochs
    with_model = [r.info.run_id for r in children if T.TAG_MODEL_URI in r.data.tags]
    assert with_model == [result.winner.run_id]  # no model for the losing trials
    table = json.loads(Path(c.download_artifacts(result.run_id, "sweep/trials.json",
                                                 str(tmp_path))).read_text())
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)
    assert parent.data.metrics["best_val_accuracy_mean"] == pytest.approx(result.ranking[0].mean)

    info = show_model(f"sweep-best/{result.model_version}", cfg.tracking.tracking_uri)
    assert info["tags"][T.TAG_SWEEP_RUN] == result.run_id
    assert info["run_id"] == result.winner.run_id
    assert f"lr-sweep  (run {result.run_id})" in render_model(info)
