"""A run the cluster cannot hold is refused before Ray Train waits on it forever; a run
waiting on resources other runs hold says so."""

from __future__ import annotations

import os

import pytest

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


def test_the_wait_message_names_what_is_short_and_how_to_free_it():
    from workflows.training.resources import waiting_message

    assert waiting_message({"CPU": 1.0}, {"CPU": 1.5}, {"CPU": 2.0}) is None
    msg = waiting_message({"CPU": 1.0, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0},
                          {"CPU": 2.0, "GPU": 1.0})
    assert "1 CPU (free now: 0.5 of 2)" in msg and "GPU" not in msg
    assert "--num-workers" in msg and "ray status" in msg


@pytest.mark.ray
def test_a_run_waiting_on_resources_another_run_holds_says_so_once(ray_local, caplog):
    """Another run holds the CPUs (a created placement group); the run's own group, made
    after the watch starts, is pending: one warning naming what it needs; once the other
    run lets go, one line that it starts. Groups from before the watch are not the run's."""
    import logging

    from ray.util import placement_group, remove_placement_group

    from workflows.training.resources import WaitNotice

    free = ray_local.available_resources().get("CPU", 0.0)
    other = placement_group([{"CPU": free}])
    ray_local.get(other.ready(), timeout=60)
    notice = WaitNotice({"CPU": 1.0}, after_s=3600)  # the test looks itself, no thread
    caplog.set_level(logging.WARNING, logger="workflows.training.resources")
    with notice:
        notice.check()  # no group of the run's yet: nothing to say
        assert not caplog.records
        mine = placement_group([{"CPU": 1.0}])
        notice.check()
        notice.check()
        waits = [r.getMessage() for r in caplog.records]
        assert len(waits) == 1 and "waiting for resources" in waits[0]
        assert "1 CPU (free now: 0 of" in waits[0]
        remove_placement_group(other)
        ray_local.get(mine.ready(), timeout=60)
        notice.check()
        notice.check()
        lines = [r.getMessage() for r in caplog.records]
        assert lines[1:] == ["the run got its resources and starts"]
        remove_placement_group(mine)


def test_train_runs_get_a_short_controller_poll_and_a_users_value_wins(monkeypatch):
    """Ray Train's controller takes a worker's report only when it polls (2 s apart by
    default): bertflow's runs poll every 0.5 s, local ones also skip the preemption
    watcher; whatever the user set is kept."""
    from data_prep.ray_env import LOCAL_RAY_TRAIN_ENV, RAY_TRAIN_ENV, set_train_env

    for key in LOCAL_RAY_TRAIN_ENV:
        monkeypatch.delenv(key, raising=False)
    set_train_env(RAY_TRAIN_ENV)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # a cluster keeps it
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    set_train_env(LOCAL_RAY_TRAIN_ENV)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
