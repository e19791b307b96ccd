"""A run the cluster cannot hold is refused before Ray Train waits on it forever."""

from __future__ import annotations

from workflows.config import LoopSettings
from workflows.training.resources import shortfalls

TWO_CPUS = [{"CPU": 2.0}]


def test_a_worker_that_leaves_ray_data_no_cpu_is_named_with_its_flag():
    """`--cpus-per-worker 1.6` on 2 CPUs: the validation split would never be read."""
    (problem,) = shortfalls(LoopSettings(cpus_per_worker=1.6), 1.6, True, TWO_CPUS)
    assert "--cpus-per-worker 1.6" in problem and "Ray Data" in problem
    assert "--cpus-per-worker 1 or less" in problem
    assert shortfalls(LoopSettings(), 1.0, True, TWO_CPUS) == []  # the default fits
    assert shortfalls(LoopSettings(cpus_per_worker=1.6), 1.6, False, TWO_CPUS) == []


def test_workers_gpus_and_the_largest_node_are_checked():
    two = LoopSettings(num_workers=2)
    assert shortfalls(two, 0.5, True, TWO_CPUS) == []
    (too_many,) = shortfalls(LoopSettings(num_workers=3), 0.8, True, TWO_CPUS)
    assert "--num-workers 3" in too_many
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert any("no node has that many" in p for p in shortfalls(LoopSettings(), 1.5, False,
                                                                 nodes))
    gpu = LoopSettings(num_workers=2, use_gpu=True)
    assert any("GPU" in p for p in shortfalls(gpu, 1.0, False, [{"CPU": 8.0, "GPU": 1.0}]))


def test_an_elastic_run_needs_room_for_its_minimum():
    elastic = LoopSettings(num_workers="1:4", cpus_per_worker=0.5)
    assert shortfalls(elastic, 0.5, True, TWO_CPUS) == []
