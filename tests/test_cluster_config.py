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
