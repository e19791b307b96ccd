"""Ray's private names behind `workflows/ray_internals.py` are still there, with the shape
bertflow relies on: a Ray upgrade that renames or moves one fails here, by name, instead
of sweeps silently starting a queue actor per trial, jobs being refused by a cluster that
wants its token, or Ray Data's log lines going to the terminal."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import logging
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from workflows import ray_internals as RI

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_ray_is_in_the_range_the_internals_are_proven_on():
    deps = re.findall(r'^\s*"(ray\[[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.M)
    ray_req = Requirement(deps[0])
    # Closed above: pip must not install a Ray these private names were not checked on.
    assert any(s.operator in ("<", "<=", "==", "~=") for s in ray_req.specifier), ray_req
    installed = importlib.metadata.version("ray")
    assert ray_req.specifier.contains(installed), (
        f"Ray {installed} is outside {ray_req.specifier}: rerun this file on it, update "
        f"workflows/ray_internals.py, then widen the range in pyproject.toml")
    pinned = [line.split("==", 1)[1].strip() for line in
              (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("ray==")]
    assert pinned and ray_req.specifier.contains(pinned[0])


def _self_attributes_assigned(func) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    targets = [t for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets]
    targets += [n.target for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)]
    return {t.attr for t in targets if isinstance(t, ast.Attribute)
            and isinstance(t.value, ast.Name) and t.value.id == "self"}


def test_a_tune_session_reads_its_report_queue_from_the_attribute_bertflow_sets():
    from ray.tune.integration.ray_train import TuneReportCallback

    session = RI._TrainSession
    attribute = RI.REPORT_QUEUE_ATTRIBUTE
    # The session's own code fills the attribute (an assignment to a renamed one would
    # only add a new attribute nobody reads)...
    assert attribute in set().union(*(_self_attributes_assigned(f) for f in
                                      vars(session).values() if inspect.isfunction(f)))
    assert attribute in _self_attributes_assigned(session._get_or_create_inter_actor_queue)
    # ...reads it when it fetches a trial's results from the Train controller...
    assert f"self.{attribute}" in inspect.getsource(session._get_result_from_queues)
    # ...and Tune's report callback takes the queue from the session when it is made, so
    # a queue adopted before TuneReportCallback() is the one the callback puts into.
    assert "_get_or_create_inter_actor_queue" in inspect.getsource(TuneReportCallback.__init__)


def test_the_report_queue_is_refused_outside_a_tune_trial():
    with pytest.raises(RuntimeError, match="not in a Ray Tune trial"):
        RI.adopt_report_queue(object())
    with pytest.raises(RuntimeError, match="not in a Ray Tune trial"):
        RI.session_report_queue()


@pytest.fixture
def no_ray_token(tmp_path):
    """No token anywhere (its own MonkeyPatch: the environment is back before the cache is
    reloaded). An xdist worker may hold a live local Ray: afterwards this process must
    send that Ray's token, in its mode, again, or the next RPC fails and Ray aborts."""
    with pytest.MonkeyPatch.context() as env:
        for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            env.delenv(var, raising=False)
        env.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
        RI.reset_auth_token_cache()
        yield env
    RI.reset_auth_token_cache()  # the next test loads the token of its own environment
    RI.follow_auth_mode_of_environment()


def test_the_auth_token_is_cached_until_the_cache_is_reset(no_ray_token):
    loader = RI.AuthenticationTokenLoader.instance()
    assert not loader.has_token(ignore_auth_mode=True)
    no_ray_token.setenv("RAY_AUTH_TOKEN", "a" * 32)
    assert loader.has_token(ignore_auth_mode=True)
    no_ray_token.delenv("RAY_AUTH_TOKEN")
    assert loader.has_token(ignore_auth_mode=True)  # the first cluster's token, cached
    RI.reset_auth_token_cache()
    assert not loader.has_token(ignore_auth_mode=True)


def test_the_jobs_client_sees_a_token_mode_set_after_ray_first_read_it(tmp_path):
    """Ray reads RAY_AUTH_MODE into its config once per process: a token mode set later (a
    second cluster, a test's environment) was not seen and the Jobs API refused the call.
    In a process of its own: flipping the mode here would cut this worker off its Ray."""
    import os
    import subprocess
    import sys

    script = textwrap.dedent("""
        import os
        from workflows import ray_internals as RI
        from workflows.ops import jobs
        jobs._use_ray_auth_token_if_present()  # no token anywhere: off, and read by Ray
        assert not RI.token_auth_mode()
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="b" * 32)
        assert not RI.token_auth_mode()  # Ray has not read it again by itself
        jobs._use_ray_auth_token_if_present()
        assert RI.token_auth_mode()
        del os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]
        jobs._use_ray_auth_token_if_present()  # back to a cluster without auth
        assert not RI.token_auth_mode()
        print("checked")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**env, "HOME": str(tmp_path)}, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "checked" in out.stdout, out.stderr[-3000:]


def test_token_mode_stays_off_without_a_token(no_ray_token):
    import os

    assert "warn_if_disabled" in inspect.signature(
        RI.maybe_enable_token_auth_if_token_available).parameters
    assert RI.enable_token_auth_if_token_available() is False
    assert "RAY_AUTH_MODE" not in os.environ


def test_the_cli_names_ray_datas_session_log_handler_by_its_current_path():
    from workflows.cli import logs

    handler = yaml.safe_load(logs._RAY_DATA_CONFIG)["handlers"]["file"]["class"]
    assert handler == RI.RAY_DATA_FILE_HANDLER
    module, _, name = handler.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert cls is RI.SessionFileHandler and issubclass(cls, logging.Handler)


def test_an_async_checkpoints_upload_reaches_ray_trains_own_upload():
    """workflows/training/async_checkpoint.py uploads through the storage context that
    `TrainContext.get_storage` returns, with Ray's own upload method and arguments."""
    import ray.train.v2.api.context as train_context

    assert hasattr(train_context.TrainContext, "get_storage")
    params = list(inspect.signature(RI.StorageContext.persist_current_checkpoint).parameters)
    assert params == ["self", "checkpoint", "checkpoint_dir_name"]
    assert "checkpoint_upload_fn" in inspect.signature(
        importlib.import_module("ray.train").report).parameters


def test_the_driver_prints_raylet_messages_through_the_name_bertflow_routes():
    """`route_raylet_messages` replaces `ray._private.worker.print_to_stdstream`: the
    driver's error listener must still look that name up when it prints."""
    import inspect

    import ray._private.worker as ray_worker

    source = inspect.getsource(ray_worker.listen_error_messages)
    assert "print_to_stdstream(" in source and '"pid": "raylet"' in source
