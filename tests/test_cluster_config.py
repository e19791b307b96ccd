"""cluster.yaml is a launcher config that `ray up` accepts, for the cluster the README promises."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_cluster_yaml_as_ray_up_does(raw):
    # `ray up` fills in the provider's defaults, then validates against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_ray_schema_rejects_a_misspelt_key(raw):
    # Proves the validation above is strict: a typo in a node type is caught, not ignored.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["worker.gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cluster_is_a_cpu_head_with_autoscaled_gpu_workers(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items()
                 if name != raw["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]


def test_nodes_install_the_project_with_pinned_versions(raw):
    mounted = {remote: local for remote, local in raw["file_mounts"].items()}
    assert "." in mounted.values(), "the project folder is not shipped to the nodes"
    remote_project = next(r for r, l in mounted.items() if l == ".")
    install = [c for c in raw["setup_commands"] if "pip install" in c and "-e" in c]
    assert install and "constraints.txt" in install[0]
    assert Path(remote_project).name in install[0]
    # The project's constraints must exist for that command to work.
    assert (CLUSTER_YAML.parent / "constraints.txt").is_file()
    for excluded in (".venv", "mlruns.db", "mlartifacts"):
        assert any(excluded in p for p in raw["rsync_exclude"])


def test_dashboard_is_not_exposed_publicly(raw):
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


def _server_start(raw) -> str:
    starts = [c for c in raw["head_start_ray_commands"] if "bertflow server" in c]
    assert len(starts) == 1, "the head must start exactly one `bertflow server`"
    return starts[0]


def test_head_runs_the_mlflow_server_on_postgresql_with_s3_artifacts_and_auth(raw):
    import re
    import shlex

    from workflows.cli.commands.server import build_parser
    from workflows.config import ServerConfig
    from workflows.cli.args import config_from_args

    start = _server_start(raw)
    assert "mlflow server" not in " ".join(raw["head_start_ray_commands"])  # one launcher
    # Secrets come from the private env file, never from the command line.
    assert ". ~/.bertflow/server.env" in start
    assert not re.search(r"postgresql://[^:@/\s]+:[^@\s]+@", start)
    assert "PASSWORD=" not in start
    command = start.split("bertflow server", 1)[1].split(" > ", 1)[0]
    argv = shlex.split(re.sub(r"\$\([^)]*\)", "10.0.0.5", command))
    args = build_parser().parse_args(argv)
    cfg = config_from_args(ServerConfig, args)
    assert cfg.auth and not cfg.insecure
    assert cfg.backend_store_uri.startswith("postgresql://")
    assert cfg.artifacts_destination.startswith("s3://")
    assert cfg.host not in ("0.0.0.0", "::")  # the private address only
    setup = " ".join(raw["head_setup_commands"])
    assert "postgresql" in setup and "[server]" in setup  # psycopg2, mlflow[auth], boto3


def test_training_checkpoints_go_to_shared_object_storage(raw):
    from workflows.ops.jobs import STORAGE_PATH_ENV

    head_start = " ".join(raw["head_start_ray_commands"])
    assert f"{STORAGE_PATH_ENV}=s3://" in head_start
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no training (and no Ray Data tasks) on the head
    assert "server.env" not in str(raw["file_mounts"])  # secrets are not synced to workers
