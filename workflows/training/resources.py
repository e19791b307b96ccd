"""What a training run asks Ray for, checked against what the cluster has before anything
starts.

Ray Train places its workers as one placement group and waits, silently and for as long
as it takes, until the cluster can hold it; Ray Data's tasks (a run handed Ray Datasets:
pretraining and fine-tuning read their own rows, both splits, and hand none) each need a
whole CPU beside the workers. On a machine that will never grow, a request that cannot
fit is a run that hangs at "Running Dataset: val" with no word (`--cpus-per-worker 1.6`
on 2 CPUs once left Ray Data 0.4 for pretraining's validation). So: on one node the run
is refused with a message naming the flag to change; on a cluster of several nodes (which
may autoscale) the run starts and says, once, what it waits for.

A run that fits the cluster can still wait: other runs or jobs on the same Ray may hold the
CPUs it needs. `WaitNotice` watches the run's start and says so, once, and once more when
the run gets its resources, instead of leaving the terminal silent.
"""

from __future__ import annotations

import logging
import threading

from workflows.config import LoopSettings
from workflows.training.contracts import TrainingError

log = logging.getLogger(__name__)

RAY_DATA_CPUS = 1.0  # a Ray Data read or map task asks for one CPU (Ray's default)


def shortfalls(loop: LoopSettings, cpus_per_worker: float, ray_data: bool,
               nodes: list[dict[str, float]]) -> list[str]:
    """Why `nodes` (each a Ray resources mapping) cannot hold the run; [] when they can.

    Pure: `check_cluster_fits` passes the live cluster. Counts the fewest workers the run
    can train with (MIN of an elastic --num-workers MIN:MAX)."""
    workers = loop.min_workers
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    problems = []
    if cpus_per_worker > biggest_cpu:
        problems.append(f"--cpus-per-worker {cpus_per_worker:g}: no node has that many CPUs "
                        f"(the largest has {biggest_cpu:g})")
    data = RAY_DATA_CPUS if ray_data else 0.0
    need = workers * cpus_per_worker + data
    if need > total_cpu + 1e-9:
        fit = (total_cpu - data) / workers
        hint = (f"give --cpus-per-worker {fit:.2g} or less, or fewer --num-workers"
                if fit > 0 else "give fewer --num-workers or a larger cluster")
        problems.append(
            f"--num-workers {loop.num_workers} x --cpus-per-worker {cpus_per_worker:g} = "
            f"{workers * cpus_per_worker:g} CPUs"
            + (f", plus {data:g} for Ray Data to read the data" if data else "")
            + f", but the cluster has {total_cpu:g}: {hint}")
    if loop.use_gpu and workers > total_gpu:
        problems.append(f"--use-gpu with --num-workers {loop.num_workers}: {workers} GPU(s) "
                        f"wanted, the cluster has {total_gpu:g}")
    return problems


def check_cluster_fits(loop: LoopSettings, cpus_per_worker: float, ray_data: bool) -> None:
    """Refuse (one node) or announce (several) a run the cluster cannot hold now."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    problems = shortfalls(loop, cpus_per_worker, ray_data, nodes)
    if not problems:
        return
    if len(nodes) <= 1:
        raise TrainingError("this machine cannot hold the run, which would wait forever: "
                            + "; ".join(problems))
    log.warning("the run waits until the cluster has room (an autoscaling cluster adds "
                "nodes; a fixed one never will): %s", "; ".join(problems))


def waiting_message(need: dict[str, float], free: dict[str, float],
                    total: dict[str, float]) -> str | None:
    """What the run waits for, or None when what is free now would hold it. Pure:
    `need` is the workers' whole request, `free`/`total` Ray's available/cluster resources."""
    short = {k: v for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    if not short:
        return None
    parts = [f"{need[k]:g} {k} (free now: {free.get(k, 0.0):g} of {total.get(k, 0.0):g})"
             for k in sorted(short)]
    return ("the run is waiting for resources that other runs or jobs on this Ray hold: "
            f"its workers need {', '.join(parts)}; it starts when they are released "
            "(`ray status` shows who holds them; stop one, or give fewer --num-workers or "
            "--cpus-per-worker)")


class WaitNotice:
    """Around `trainer.fit()`: the placement groups created after it starts are the run's
    (Ray Train asks for its workers as one, again on each restart). While one of them is
    pending for longer than `after_s` and the free resources cannot hold `need`, log once
    that the run waits and for what; log once more when it gets them. It only reads Ray's
    state and never raises into the run."""

    def __init__(self, need: dict[str, float], after_s: float = 20.0,
                 every_s: float = 10.0) -> None:
        self.need = {k: v for k, v in need.items() if v > 0}
        self.after_s, self.every_s = after_s, every_s
        self.announced = False
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bertflow-wait-notice",
                                        daemon=True)

    def __enter__(self) -> "WaitNotice":
        try:
            self._seen = set(self._groups())
        except Exception:  # Ray's state is unavailable: no notice, the run goes on
            log.debug("resource watch not started", exc_info=True)
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _groups() -> dict[str, dict]:
        from ray.util import placement_group_table

        return placement_group_table()

    def _watch(self) -> None:
        if self._stop.wait(self.after_s):
            return
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:
                log.debug("resource watch stopped", exc_info=True)
                return
            self._stop.wait(self.every_s)

    def check(self) -> None:
        """One look at the run's placement groups (the thread calls it every `every_s`)."""
        import ray

        mine = {k: g for k, g in self._groups().items() if k not in self._seen}
        settled = [k for k, g in mine.items() if g.get("state") != "PENDING"]
        self._seen.update(settled)  # later looks consider only newer groups (a restart)
        if any(mine[k].get("state") == "CREATED" for k in settled):
            if self.announced:
                log.warning("the run got its resources and starts")
                self.announced = False
            return
        if len(settled) == len(mine) or self.announced:
            return
        message = waiting_message(self.need, ray.available_resources(),
                                  ray.cluster_resources())
        if message:
            log.warning("%s", message)
            self.announced = True
