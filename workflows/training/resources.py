"""What a training run asks Ray for, checked against what the cluster has before anything
starts.

Ray Train places its workers as one placement group and waits, silently and for as long
as it takes, until the cluster can hold it; Ray Data's tasks (reading the validation split,
or a task's train rows) each need a whole CPU beside the workers. On a machine that will
never grow, a request that cannot fit is a run that hangs at "Running Dataset: val" with
no word (`--cpus-per-worker 1.6` on 2 CPUs leaves Ray Data 0.4). So: on one node the run
is refused with a message naming the flag to change; on a cluster of several nodes (which
may autoscale) the run starts and says, once, what it waits for.
"""

from __future__ import annotations

import logging
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

