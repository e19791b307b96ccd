"""The shipped cluster definitions (cluster.yaml, cluster-8xgpu.yaml, deploy/) are what
`ray up` and KubeRay accept, for the cluster docs/cluster.md promises, and every shipped
pretraining and fine-tuning config can be scheduled on them.

Fast: nothing starts Ray (one `slow` test starts a real MLflow server for the jobs' user). Ray's own launcher code checks the configs (prepare_config and
validate_config, as `ray up` calls them) and Ray's own autoscaler planner (get_nodes_for,
what the autoscaler runs to pick nodes for pending resource demands) places each job's
Train workers, built as Ray Train's ScalingConfig builds them.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from functools import partial
from pathlib import Path

import jsonschema
import pytest
import yaml
# Ray's cluster launcher and autoscaler have no public API for this; these are the
# functions `ray up` and the autoscaler call (Ray 2.60). An upgrade that renames one fails
# this import loudly.
from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (
    _default_utilization_scorer, get_nodes_for)
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = {"cluster.yaml": ROOT / "cluster.yaml",
                 "cluster-8xgpu.yaml": ROOT / "cluster-8xgpu.yaml"}
DEPLOY = ROOT / "deploy"
TRAINING_CONFIGS = sorted([*(ROOT / "configs").glob("pretrain_*.yaml"),
                           *(ROOT / "configs").glob("finetune_*.yaml")])
# What each instance type named in the configs has: (vCPUs, NVIDIA GPUs, EFA interfaces).
INSTANCE_TYPES = {"m6i.2xlarge": (8, 0, 0), "g5.xlarge": (4, 1, 0), "g5.12xlarge": (48, 4, 0),
                  "g6e.xlarge": (4, 1, 0), "p4d.24xlarge": (96, 8, 4),
                  "p5.48xlarge": (192, 8, 32)}


@pytest.fixture(scope="module")
def raw() -> dict[str, dict]:
    return {name: yaml.safe_load(path.read_text()) for name, path in CLUSTER_FILES.items()}


def prepared(cfg: dict) -> dict:
    """The config as `ray up` sees it: the provider's defaults filled in, then validated
    against Ray's schema."""
    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def workers(cfg: dict) -> dict[str, dict]:
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


def head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def bucket_of(cfg: dict) -> str:
    setup = " ".join(cfg["head_setup_commands"])
    found = re.findall(r"setup-head\.sh\s+s3://([^\s/]+)", setup)
    assert len(found) == 1, "the head's setup must name the bucket exactly once"
    return found[0]


def comment_lines_above(text: str, line_re: str) -> list[str]:
    """The comment block right above each line matching `line_re` (stripped), joined with
    the line itself: where a CHANGE marker for that line must be."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if re.search(line_re, line):
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                j -= 1
            blocks.append(" ".join(l.strip() for l in lines[j + 1:i + 1]))
    return blocks


# ------------------------------------------------------------------ what `ray up` accepts


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_accepts_the_cluster_as_ray_up_does(raw, name):
    cfg = prepared(raw[name])
    assert head(cfg)["resources"] == {"CPU": 0}  # no training or Ray Data on the head
    for t in workers(cfg).values():
        assert t["resources"].get("GPU", 0) >= 1
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


def test_ray_schema_rejects_a_misspelt_key(raw):
    # Proves the validation above is strict: a typo in a node type is caught, not ignored.
    broken = copy.deepcopy(raw["cluster.yaml"])
    broken["available_node_types"]["worker.gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepared(broken)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_starts_from_the_one_pinned_image(raw, name):
    cfg = raw[name]
    images = {t["node_config"]["ImageId"] for t in cfg["available_node_types"].values()}
    assert images == {cfg["metadata"]["image"]}, "one image for every node type"
    build = (DEPLOY / "aws" / "build-image.sh").read_text()
    base = re.search(r'BASE_AMI_NAME:-"([^"]+)"', build).group(1)
    assert re.fullmatch(r"Deep Learning Base OSS Nvidia Driver GPU AMI \(Ubuntu 24\.04\) \d{8}", base)
    # The comment names and dates the base the image is baked from, as the build pins it.
    assert base in CLUSTER_FILES[name].read_text()
    # Ray's default (an Ubuntu 18.04 DLAMI with Python <= 3.8 and CUDA 11) is never used.
    assert all("ImageId" in t["node_config"] for t in cfg["available_node_types"].values())


def test_both_clusters_share_image_roles_and_bucket(raw):
    a, b = raw["cluster.yaml"], raw["cluster-8xgpu.yaml"]
    assert a["metadata"]["image"] == b["metadata"]["image"]
    assert bucket_of(a) == bucket_of(b)
    assert a["provider"]["region"] == b["provider"]["region"]
    for cfg in (a, b):
        assert head(cfg)["node_config"]["IamInstanceProfile"]["Name"] == "bertflow-head"
        assert {t["node_config"]["IamInstanceProfile"]["Name"]
                for t in workers(cfg).values()} == {"bertflow-worker"}


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_the_region_is_named_in_one_place(raw, name):
    region = raw[name]["provider"]["region"]
    assert CLUSTER_FILES[name].read_text().count(region) == 1
    # Nothing the nodes run names a region: they read it from the instance metadata.
    region_like = re.compile(r"\b(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-\d\b")
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not region_like.search(path.read_text()), f"{path} names a region"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_resources_follow_the_instance_type_and_are_marked_change(raw, name):
    text = CLUSTER_FILES[name].read_text()
    for t in workers(raw[name]).values():
        cpus, gpus, _ = INSTANCE_TYPES[t["node_config"]["InstanceType"]]
        assert t["resources"] == {"CPU": cpus, "GPU": gpus}
    # Whoever changes the instance type is told to change resources with it.
    for block in comment_lines_above(text, r"^\s+resources: \{\"CPU\": [1-9]"):
        assert "CHANGE" in block and "InstanceType" in block, block
    for block in comment_lines_above(text, r"^\s+InstanceType: [gp]"):
        assert "CHANGE" in block, block


def test_only_placeholders_marked_change(raw):
    for name, path in CLUSTER_FILES.items():
        for line in path.read_text().splitlines():
            if "CHANGE-" in line.split("#", 1)[0]:
                assert "# CHANGE" in line, f"{name}: unmarked placeholder: {line.strip()}"


# ------------------------------------------------------------------ the 8-GPU EFA node type


def test_the_8_gpu_node_type_uses_efa_in_a_placement_group(raw):
    cfg = prepared(raw["cluster-8xgpu.yaml"])
    (node_type,) = workers(cfg).values()
    node = node_type["node_config"]
    cpus, gpus, efa = INSTANCE_TYPES[node["InstanceType"]]
    assert gpus == 8 and efa >= 1
    nics = node["NetworkInterfaces"]
    assert len(nics) == efa and all(n["InterfaceType"] == "efa" for n in nics)
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(efa))
    assert [n["DeviceIndex"] for n in sorted(nics, key=lambda n: n["NetworkCardIndex"])] \
        == [0] + [1] * (efa - 1)
    assert node["Placement"]["GroupName"]
    assert "InstanceMarketOptions" not in node  # on-demand: a lost spot node stops all ranks
    # Ray's own NetworkInterfaces step of `ray up` accepts it, and the head lands in the same
    # subnet and security group (EFA and Ray's ports need all traffic within the group).
    resolved = _configure_from_network_interfaces(cfg)
    worker_cfg = next(iter(workers(resolved).values()))["node_config"]
    head_cfg = head(resolved)["node_config"]
    assert set(worker_cfg["SubnetIds"]) == set(head_cfg["SubnetIds"])  # one per interface
    assert set(worker_cfg["SecurityGroupIds"]) == set(head_cfg["SecurityGroupIds"])


def test_the_8_gpu_workers_start_ray_with_nccl_over_efa(raw):
    cfg = raw["cluster-8xgpu.yaml"]
    start = " ".join(cfg["worker_start_ray_commands"])
    assert ". ~/bertflow/deploy/aws/efa.env" in start and "ulimit -l unlimited" in start
    assert start.index("efa.env") < start.index("ray start")
    env = subprocess.run(["bash", "-c", "set -a; . deploy/aws/efa.env; env"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    settings = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    assert settings["FI_PROVIDER"] == "efa"
    assert settings["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert settings["NCCL_SOCKET_IFNAME"].startswith("^lo")
    assert "/opt/amazon/ofi-nccl/lib" in settings["LD_LIBRARY_PATH"].split(":")
    assert "" not in settings["LD_LIBRARY_PATH"].split(":")  # no empty entry (= the cwd)
    assert any("check-efa.sh" in c for c in cfg["worker_setup_commands"])


# ------------------------------------------------------------------ every job can be scheduled


def train_bundles(path: Path, use_gpu: bool | None = None) -> list[dict[str, float]]:
    """The resource bundles of a config's Ray Train workers, as Ray Train's ScalingConfig
    builds them from what workflows.training.engine.run_training passes it."""
    from ray.train import ScalingConfig

    from bert_core.config_io import read_mapping
    from workflows.config import FinetuneConfig, PretrainConfig, config_from_mapping

    cls = PretrainConfig if path.name.startswith("pretrain") else FinetuneConfig
    data = read_mapping(path)
    required = {"data": "s3://b/d", "run_name": "r", "base": "models:/b@a", "train": "s3://b/t"}
    data = {**{k: v for k, v in required.items() if k in cls.__dataclass_fields__}, **data}
    loop = config_from_mapping(cls, data, str(path)).loop
    gpu = loop.use_gpu if use_gpu is None else use_gpu
    # engine.default_cpus_per_worker: 1 with GPUs; on CPUs a share of the cluster, at most 1.
    cpus = loop.cpus_per_worker if loop.cpus_per_worker is not None else 1.0
    scaling = ScalingConfig(num_workers=loop.num_workers, use_gpu=gpu,
                            resources_per_worker={"CPU": cpus})
    bundle = {k: float(v) for k, v in scaling._resources_per_worker_not_none.items() if v}
    return [dict(bundle) for _ in range(scaling.num_workers)]


def unplaced(cfg: dict, bundles: list[dict[str, float]]) -> list[dict[str, float]]:
    """What Ray's autoscaler planner cannot place on the nodes `cfg` may start (an empty
    list: the job can be scheduled)."""
    cfg = prepared(cfg)
    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, left = get_nodes_for(cfg["available_node_types"], {cfg["head_node_type"]: 1},
                                 cfg["head_node_type"], cfg["max_workers"], bundles,
                                 utilization_scorer=scorer)
    assert sum(to_add.values()) <= cfg["max_workers"]
    return left


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_can_be_scheduled(raw, path):
    bundles = train_bundles(path)
    fits = [name for name, cfg in raw.items() if not unplaced(cfg, bundles)]
    assert fits, f"{path.name}: {len(bundles)} x {bundles[0]} fits no shipped cluster"
    if path.name.startswith("pretrain_base"):
        assert "cluster-8xgpu.yaml" in fits  # what docs/cluster.md runs it on
    if path.name.startswith("finetune"):
        # docs/cluster.md submits fine-tuning with --use-gpu on cluster.yaml.
        assert not unplaced(raw["cluster.yaml"], train_bundles(path, use_gpu=True))


def test_the_schedulability_check_fails_when_a_job_is_too_big(raw):
    phase1 = ROOT / "configs" / "pretrain_base_phase1.yaml"
    bundles = train_bundles(phase1)
    assert len(bundles) == 8 and bundles[0] == {"CPU": 1.0, "GPU": 1.0}
    # The one-GPU cluster allows 4 GPUs: 4 of the 8 workers cannot be placed.
    assert len(unplaced(raw["cluster.yaml"], bundles)) == 4
    # 17 GPUs are more than two 8-GPU nodes.
    assert len(unplaced(raw["cluster-8xgpu.yaml"], bundles * 2 + bundles[:1])) == 1


# ------------------------------------------------------------------ permissions


def policy(name: str) -> list[dict]:
    return json.loads((DEPLOY / "aws" / "iam" / name).read_text())["Statement"]


def allowed(statements: list[dict], action: str) -> list[dict]:
    def matches(pattern: str) -> bool:
        return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), action) is not None
    return [s for s in statements if s["Effect"] == "Allow"
            and any(matches(a) for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))]


def resources(statements: list[dict]) -> set[str]:
    return {r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str)
                                            else s["Resource"])}


def test_the_head_policy_lets_the_autoscaler_start_and_stop_workers(raw):
    head_policy = policy("head-policy.json")
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                   "ec2:DescribeInstanceTypes", "ec2:DescribeSubnets",
                   "ec2:DescribeSecurityGroups", "ec2:TerminateInstances"):
        assert allowed(head_policy, action), action
    # It may stop only this project's clusters' nodes.
    (terminate,) = allowed(head_policy, "ec2:TerminateInstances")
    names = terminate["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"]
    assert {cfg["cluster_name"] for cfg in raw.values()} <= set(names)
    # iam:PassRole on the role of the workers' instance profile (named alike in the docs).
    passed = resources(allowed(head_policy, "iam:PassRole"))
    for cfg in raw.values():
        for t in workers(cfg).values():
            role = t["node_config"]["IamInstanceProfile"]["Name"]
            assert f"arn:aws:iam::*:role/{role}" in passed


def test_the_policies_name_the_bucket_and_the_secrets_parameter(raw):
    bucket = bucket_of(raw["cluster.yaml"])
    for name in ("head-policy.json", "worker-policy.json"):
        statements = policy(name)
        assert resources(allowed(statements, "s3:ListBucket")) == {f"arn:aws:s3:::{bucket}"}
        assert resources(allowed(statements, "s3:PutObject")) == {f"arn:aws:s3:::{bucket}/*"}
    setup = (DEPLOY / "aws" / "setup-head.sh").read_text()
    parameter = re.search(r"^SSM_PARAMETER=(\S+)$", setup, re.M).group(1)
    assert resources(allowed(policy("head-policy.json"), "ssm:GetParameter")) \
        == {f"arn:aws:ssm:*:*:parameter{parameter}"}
    # Workers may do nothing but use the bucket: no EC2, no secrets.
    worker_actions = {a for s in policy("worker-policy.json")
                      for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(a.startswith("s3:") for a in worker_actions)


# ------------------------------------------------------------------ node setup


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_nodes_install_the_pinned_venv_without_reinstalling_it(raw, name):
    cfg = raw[name]
    remote_project = next(r for r, local in cfg["file_mounts"].items() if local == ".")
    setup = cfg["setup_commands"]
    assert setup[0] == f"sudo bash {remote_project.replace('/home/ubuntu', '~')}/deploy/aws/install-venv.sh " \
                       f"{remote_project.replace('/home/ubuntu', '~')}"
    assert not any("pip install" in c for c in setup + cfg["head_setup_commands"])
    for excluded in (".venv", "mlruns.db", "mlartifacts", "*.env"):
        assert any(excluded in p for p in cfg["rsync_exclude"])
    assert "server.env" not in str(cfg["file_mounts"])  # secrets are not synced to workers


def test_install_venv_skips_installed_dependencies_and_checks_the_driver():
    script = (DEPLOY / "aws" / "install-venv.sh").read_text()
    constraints = (ROOT / "constraints.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    assert torch_pin == "2.13.0" and f"torch {torch_pin}" in script
    # torch 2.13.0's PyPI wheel is the CUDA 13.0 build: the driver must be >= 580.
    assert int(re.search(r"^MIN_DRIVER_MAJOR=(\d+)", script, re.M).group(1)) >= 580
    # The dependency install is guarded by the stamp of constraints.txt + pyproject.toml.
    guard = script.index('if [ ! -f "$VENV/.deps-$stamp" ]')
    assert guard < script.index('-c "$PROJECT/constraints.txt"')
    assert "constraints.txt" in script[:guard] and "pyproject.toml" in script[:guard]
    # uv, which installs Python and the wheels, is pinned too.
    assert re.search(r"^UV_VERSION=\d+\.\d+\.\d+", script, re.M)


def run_install_venv(tmp_path: Path, driver: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """deploy/aws/install-venv.sh with BERTFLOW_PREFIX in tmp_path, a stand-in `uv` that
    records its calls (and creates the venv, whose python is this test's python), and an
    `nvidia-smi` that reports `driver` (None: no GPU)."""
    import sys

    prefix, bin_dir, project = tmp_path / "prefix", tmp_path / "bin", tmp_path / "project"
    calls = tmp_path / "uv-calls"
    for d in (prefix / "uv" / "bin", bin_dir, project):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("constraints.txt", "pyproject.toml"):
        if not (project / name).exists():
            (project / name).write_text((ROOT / name).read_text())
    uv = prefix / "uv" / "bin" / "uv"
    uv.write_text(f"""#!/bin/bash
[ "$1" = --version ] && {{ echo "uv 0.13.8"; exit 0; }}
echo "$*" >> {calls}
if [ "$1" = venv ]; then
    mkdir -p "${{@: -1}}/bin"
    printf '#!/bin/sh\\nexec {sys.executable} "$@"\\n' > "${{@: -1}}/bin/python"
    chmod +x "${{@: -1}}/bin/python"
fi
""")
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n" if driver is None else
                   f'#!/bin/sh\ncase "$*" in *driver_version*) echo {driver};; *) echo "GPU 0";; esac\n')
    for stub in (uv, smi):
        stub.chmod(0o755)
    done = subprocess.run(["bash", str(DEPLOY / "aws" / "install-venv.sh"), str(project)],
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "BERTFLOW_PREFIX": str(prefix)},
                          capture_output=True, text=True)
    logged = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return done, logged


def test_install_venv_installs_the_dependencies_once_then_only_bertflow(tmp_path):
    done, calls = run_install_venv(tmp_path, driver=None)
    assert done.returncode == 0, done.stderr
    assert any(c.startswith("python install 3.11") for c in calls)
    (deps,) = [c for c in calls if "-c " in c]
    assert deps.endswith("project/constraints.txt " + str(tmp_path / "project") + "[server]")
    assert calls[-1].endswith("--no-deps --reinstall-package bertflow " + str(tmp_path / "project"))
    (stamp,) = (tmp_path / "prefix" / "venv").glob(".deps-*")
    # A node that starts again (or from the baked image) installs only bertflow's own code.
    done, calls = run_install_venv(tmp_path, driver=None)
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1 and "--reinstall-package bertflow" in calls[0]
    # New pins: the dependencies are installed again, under a new stamp.
    with open(tmp_path / "project" / "constraints.txt", "a") as f:
        f.write("tqdm==4.67.1\n")
    done, calls = run_install_venv(tmp_path, driver=None)
    assert done.returncode == 0 and any("-c " in c for c in calls)
    assert [p.name for p in (tmp_path / "prefix" / "venv").glob(".deps-*")] != [stamp.name]


def test_install_venv_refuses_a_driver_too_old_for_torchs_cuda(tmp_path):
    done, calls = run_install_venv(tmp_path, driver="550.54.15")
    assert done.returncode == 1 and "too old" in done.stderr and not calls


def test_install_venv_fails_a_gpu_node_whose_torch_sees_no_gpu(tmp_path):
    # A GPU node (its driver is new enough) where torch sees none: setup fails instead of
    # the node joining and every training job on it crashing. (This test's torch: no GPU.)
    done, _ = run_install_venv(tmp_path, driver="595.91.07")
    assert "sees 0 GPU(s)" in done.stdout  # torch itself was asked
    assert done.returncode == 1 and "torch sees no GPU" in done.stderr


def test_node_scripts_are_valid_bash():
    for path in DEPLOY.rglob("*.sh"):
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_apt_waits_for_the_first_boot_and_updates_before_installing(tmp_path):
    # Run lib.sh's apt_install against stand-ins for the system tools it calls, in order.
    calls = tmp_path / "calls"
    for tool, rc in (("cloud-init", 0), ("fuser", 1), ("pgrep", 1), ("apt-get", 0)):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit {rc}\n')
        stub.chmod(0o755)
    subprocess.run(["bash", "-c", f'PATH="{tmp_path}:$PATH"; . deploy/aws/lib.sh; '
                                  "apt_install postgresql"], cwd=ROOT, check=True)
    log = calls.read_text().splitlines()
    assert log[0].startswith("cloud-init status --wait")
    assert any(l.startswith("fuser /var/lib/dpkg/lock-frontend") for l in log)
    apt = [l for l in log if l.startswith("apt-get")]
    assert len(apt) == 2 and " update" in apt[0] and "install -y -qq postgresql" in apt[1]
    assert all("DPkg::Lock::Timeout=" in l for l in apt)


# ------------------------------------------------------------------ the head's services


def unit_file() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "bertflow-mlflow.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_mlflow_server_is_a_supervised_unit_as_its_own_user():
    from workflows.cli.args import config_from_args
    from workflows.cli.commands.server import build_parser
    from workflows.config import ServerConfig

    unit = unit_file()
    assert unit["User"] == ["mlflow"] and unit["Restart"] == ["on-failure"]
    assert "/etc/bertflow/server.env" in unit["EnvironmentFile"]
    assert unit["WantedBy"] == ["multi-user.target"] and "postgresql.service" in unit["Requires"][0]
    (exec_start,) = unit["ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert program == "/opt/bertflow/venv/bin/bertflow" and argv[0] == "server"
    setup = (DEPLOY / "aws" / "setup-head.sh").read_text()
    # Every ${VAR} of ExecStart is written by setup-head.sh into the unit's settings file.
    for var in re.findall(r"\$\{(\w+)\}", exec_start):
        assert re.search(rf"{var}=%s", setup), var
    argv = [a.replace("${BERTFLOW_SERVER_HOST}", "10.0.0.5")
             .replace("${BERTFLOW_ARTIFACTS}", "s3://bucket/mlartifacts") for a in argv[1:]]
    cfg = config_from_args(ServerConfig, build_parser().parse_args(argv))
    assert cfg.auth and not cfg.insecure and cfg.host not in ("0.0.0.0", "::")
    # PostgreSQL by peer authentication on its socket: no password exists to leak.
    assert cfg.backend_store_uri == "postgresql://mlflow@/mlflow?host=/var/run/postgresql"
    assert "PASSWORD" not in exec_start


def test_the_head_installs_the_unit_idempotently_and_starts_nothing_else(raw):
    setup = (DEPLOY / "aws" / "setup-head.sh").read_text()
    assert "systemctl enable" in setup and "nohup" not in setup
    assert re.search(r'systemctl restart "\$UNIT"; else systemctl start "\$UNIT"', setup)
    assert "dpkg -s postgresql >/dev/null 2>&1 || apt_install postgresql" in setup
    assert "runuser -u postgres -- createuser mlflow" in setup  # PostgreSQL's own user
    for cfg in raw.values():
        commands = " ".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
        assert "bertflow server" not in commands and "nohup" not in commands
        assert " &" not in commands.replace("&&", "")


def run_setup_head(tmp_path: Path, secrets_text: str) -> tuple[list[str], Path]:
    """deploy/aws/setup-head.sh against stand-ins for the machine's tools (apt, dpkg,
    systemctl, PostgreSQL's client, the instance metadata, the venv's python reading SSM)
    that record what they are asked; /etc paths under tmp_path. Returns (calls, etc)."""
    bin_dir, state, etc = tmp_path / "bin", tmp_path / "state", tmp_path / "etc"
    venv_bin = tmp_path / "prefix" / "venv" / "bin"
    for d in (bin_dir, state, venv_bin, tmp_path / "units"):
        d.mkdir(parents=True, exist_ok=True)
    calls = tmp_path / "calls"
    (tmp_path / "ssm-value").write_text(secrets_text)
    stubs = {
        "cloud-init": "exit 0", "fuser": "exit 1", "pgrep": "exit 1",
        "apt-get": f'case "$*" in *install*) touch {state}/pg;; esac',
        "dpkg": f"[ -f {state}/pg ]",
        "systemctl": "exit 0",
        "id": f'[ "$1 $2" = "-u mlflow" ] && {{ [ -f {state}/user ]; exit; }}; echo 0',
        "useradd": f"touch {state}/user",
        "hostname": "echo 10.0.0.5",
        "curl": 'case "$*" in *PUT*) echo token;; *region*) echo us-east-2;; esac',
        "runuser": (f'case "$*" in *createuser*) touch {state}/role;; *createdb*) touch {state}/db;; '
                    f'*pg_roles*) [ -f {state}/role ] && echo 1;; *pg_database*) [ -f {state}/db ] && echo 1;; '
                    '*"SELECT 1"*) echo 1;; esac; exit 0'),
    }
    for tool, body in stubs.items():
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/bash\necho "{tool} $*" >> {calls}\n{body}\n')
        stub.chmod(0o755)
    python = venv_bin / "python"
    python.write_text(f'#!/bin/bash\nif [ "$1" = - ]; then cat > /dev/null; cat {tmp_path}/ssm-value; '
                      f'else echo "python $*" >> {calls}; fi\n')
    python.chmod(0o755)
    subprocess.run(["bash", str(DEPLOY / "aws" / "setup-head.sh"), "s3://bkt"], check=True,
                   capture_output=True, text=True,
                   env={"PATH": f"{bin_dir}:/usr/bin:/bin", "BERTFLOW_PREFIX": str(tmp_path / "prefix"),
                        "BERTFLOW_ETC": str(etc), "BERTFLOW_UNIT_DIR": str(tmp_path / "units")})
    logged = calls.read_text().splitlines()
    calls.unlink()
    return logged, etc


def test_a_second_ray_up_restarts_nothing_and_installs_nothing(tmp_path):
    secrets_text = "MLFLOW_AUTH_ADMIN_PASSWORD=adm1n\nBERTFLOW_JOBS_PASSWORD=j0bs\n"
    calls, etc = run_setup_head(tmp_path, secrets_text)
    assert any(c.startswith("apt-get") and "install -y -qq postgresql" in c for c in calls)
    assert "useradd --system" in " ".join(calls)
    assert any("createuser mlflow" in c for c in calls) and any("createdb -O mlflow mlflow" in c for c in calls)
    assert "systemctl restart bertflow-mlflow.service" in calls
    assert any(c.startswith("python deploy/mlflow_jobs_user.py http://10.0.0.5:5000") for c in calls)
    # The server's files: secrets private, the server gets only the admin's line.
    assert (etc / "secrets.env").stat().st_mode & 0o777 == 0o600
    assert (etc / "server.env").read_text() == "MLFLOW_AUTH_ADMIN_PASSWORD=adm1n\n"
    assert (etc / "server.env").stat().st_mode & 0o777 == 0o600
    mlflow_env = (etc / "mlflow.env").read_text()
    assert "BERTFLOW_SERVER_HOST=10.0.0.5\n" in mlflow_env and "BERTFLOW_ARTIFACTS=s3://bkt/mlartifacts\n" in mlflow_env
    assert "AWS_REGION=us-east-2\n" in mlflow_env
    assert "BERTFLOW_STORAGE_PATH=s3://bkt/runs\n" in (etc / "cluster.env").read_text()
    assert (tmp_path / "units" / "bertflow-mlflow.service").read_text() == \
        (DEPLOY / "systemd" / "bertflow-mlflow.service").read_text()

    # `ray up` again, nothing changed: no package, user, role or database again, and the
    # running server is left alone (systemd starts it only if it is not running).
    calls, _ = run_setup_head(tmp_path, secrets_text)
    assert not [c for c in calls if c.startswith(("apt-get", "useradd"))]
    assert not [c for c in calls if "createuser" in c or "createdb" in c]
    assert "systemctl start bertflow-mlflow.service" in calls
    assert not [c for c in calls if c.startswith("systemctl restart")]

    # A rotated secret restarts it (one server, the new settings).
    calls, _ = run_setup_head(tmp_path, secrets_text.replace("adm1n", "n3w"))
    assert "systemctl restart bertflow-mlflow.service" in calls
    assert (etc / "server.env").read_text() == "MLFLOW_AUTH_ADMIN_PASSWORD=n3w\n"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_runs_with_token_auth_and_a_private_dashboard(raw, name):
    cfg = raw[name]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for start in (head_start, " ".join(cfg["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token ray start" in start
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_training_checkpoints_go_to_the_bucket(raw):
    from workflows.ops.jobs import STORAGE_PATH_ENV

    setup = (DEPLOY / "aws" / "setup-head.sh").read_text()
    assert re.search(rf"{STORAGE_PATH_ENV}=%s/runs", setup)
    for cfg in raw.values():
        assert ". /etc/bertflow/cluster.env" in " ".join(cfg["head_start_ray_commands"])


# ------------------------------------------------------------------ KubeRay


def manifests() -> list[dict]:
    docs = []
    for name in ("raycluster.yaml", "mlflow.yaml"):
        docs += [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    else:
        pods = [spec["template"]]
    return [c for p in pods for c in p["spec"]["containers"]]


def secret_refs(container: dict) -> set[tuple[str, str]]:
    refs = {(e["secretRef"]["name"], "*") for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
             for e in container.get("env", []) if "valueFrom" in e}
    return refs


def test_kuberay_manifests_parse_and_name_one_image_of_the_pinned_ray():
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"RayCluster", "Deployment", "StatefulSet", "Service"}
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == ray_pin
    images = {c["image"] for d in docs if d["kind"] != "StatefulSet" and d["kind"] in
              ("RayCluster", "Deployment", "Job") for c in containers(d)}
    assert len(images) == 1
    (image,) = images
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py311$", dockerfile, re.M)
    assert image.endswith(f"/bertflow:ray{ray_pin}-py311") and f"bertflow:ray{ray_pin}-py311" in dockerfile


def test_kuberay_workers_match_the_launcher_clusters(raw):
    (cluster,) = [d for d in manifests() if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    pairs = {"gpu": workers(raw["cluster.yaml"])["worker.gpu"],
             "gpu8": workers(raw["cluster-8xgpu.yaml"])["worker.8xgpu"]}
    for group_name, node_type in pairs.items():
        group = groups[group_name]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == node_type["resources"]["GPU"]
        assert 1 <= float(limits["cpu"]) <= node_type["resources"]["CPU"]
        assert group["maxReplicas"] == node_type["max_workers"]
        assert group["minReplicas"] == node_type["min_workers"]
    bucket = bucket_of(raw["cluster.yaml"])
    text = (DEPLOY / "kuberay" / "raycluster.yaml").read_text()
    assert f"s3://{bucket}/runs" in text


def test_every_shipped_training_config_fits_the_kuberay_layout():
    (cluster,) = [d for d in manifests() if d["kind"] == "RayCluster"]
    node_types = {"head": {"resources": {"CPU": 0}, "min_workers": 0, "max_workers": 0,
                           "node_config": {}}}
    for g in cluster["spec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        node_types[g["groupName"]] = {"resources": {"CPU": int(limits["cpu"]),
                                                    "GPU": int(limits["nvidia.com/gpu"])},
                                      "min_workers": g["minReplicas"],
                                      "max_workers": g["maxReplicas"], "node_config": {}}
    layout = {"cluster_name": "kuberay", "provider": {"type": "local", "head_ip": "x"},
              "max_workers": sum(t["max_workers"] for t in node_types.values()),
              "available_node_types": node_types, "head_node_type": "head"}
    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    for path in TRAINING_CONFIGS:
        bundles = train_bundles(path)
        _, left = get_nodes_for(node_types, {"head": 1}, "head", layout["max_workers"],
                                bundles, utilization_scorer=scorer)
        assert not left, f"{path.name} does not fit the KubeRay layout"


def test_kuberay_secrets_stay_with_their_pods():
    docs = manifests()
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    ray_refs = set().union(*(secret_refs(c) for c in containers(cluster)))
    # Ray pods (where job code runs) get the bucket's keys and Ray's token, never the
    # MLflow server's or the database's secrets.
    assert {name for name, _ in ray_refs} == {"bertflow-s3", "bertflow-ray-token"}
    server = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = containers(server)
    assert {("bertflow-mlflow", "PGPASSWORD"), ("bertflow-mlflow", "MLFLOW_AUTH_ADMIN_PASSWORD"),
            ("bertflow-s3", "*")} <= secret_refs(container)
    # Every secret and key the manifests use is one docs/cluster.md tells you to create.
    docs_text = (ROOT / "docs" / "cluster.md").read_text()
    for d in docs:
        if d["kind"] in ("RayCluster", "Deployment", "StatefulSet", "Job"):
            for c in containers(d):
                for name, key in secret_refs(c):
                    assert f"kubectl -n bertflow create secret generic {name}" in docs_text, name
                    assert key == "*" or key in docs_text, key


def test_the_kuberay_server_is_bertflow_server_with_auth_on_postgresql_and_s3(raw):
    from workflows.cli.args import config_from_args
    from workflows.cli.commands.server import build_parser
    from workflows.config import ServerConfig

    server = next(d for d in manifests() if d["kind"] == "Deployment")
    (container,) = containers(server)
    program, verb, *argv = container["command"]
    assert (program, verb) == ("bertflow", "server")
    cfg = config_from_args(ServerConfig, build_parser().parse_args(argv))
    assert cfg.auth and cfg.backend_store_uri.startswith("postgresql://mlflow@bertflow-postgres:")
    assert cfg.artifacts_destination == f"s3://{bucket_of(raw['cluster.yaml'])}/mlartifacts"
    assert ":" not in cfg.backend_store_uri.split("//", 1)[1].split("@", 1)[0]  # no password


# ------------------------------------------------------------------ the jobs' MLflow user


@pytest.mark.slow  # a real server: 30-60 s idle, 3.5 min with load average 27 on 2 cores
def test_jobs_get_a_user_of_their_own_that_is_not_the_admin(tmp_path, monkeypatch):
    # deploy/mlflow_jobs_user.py against a real `bertflow server --auth` (sqlite store).
    import importlib.util
    import os
    import secrets

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from tests.services import free_ports
    from workflows.config import ServerConfig
    from workflows.ops import server

    spec = importlib.util.spec_from_file_location("mlflow_jobs_user",
                                                  DEPLOY / "mlflow_jobs_user.py")
    jobs_user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs_user)

    admin_password, first, second = (secrets.token_hex(8) for _ in range(3))
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
    with open(tmp_path / "server.log", "wb") as log:
        proc, url = server.start_server(
            ServerConfig(port=free_ports(1)[0], tracking_uri=f"sqlite:///{tmp_path}/mlruns.db",
                         auth=True, workers=1), timeout_s=300, env=env, stdout=log,
            stderr=subprocess.STDOUT)
    try:
        def as_user(name: str, password: str) -> None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

        as_user("admin", admin_password)
        assert jobs_user.ensure_jobs_user(url, "bertflow-jobs", first) == "created"
        assert AuthServiceClient(url).get_user("bertflow-jobs").is_admin is False

        # The jobs user logs runs and registers models ...
        as_user("bertflow-jobs", first)
        client = mlflow.MlflowClient(url)
        experiment = client.create_experiment("bert-base")
        client.log_metric(client.create_run(experiment).info.run_id, "loss", 1.0)
        client.create_registered_model("bert-base")
        # ... but cannot manage users.
        with pytest.raises(MlflowException, match="(?i)permission|403"):
            AuthServiceClient(url).create_user("intruder", secrets.token_hex(8))

        # A second `ray up` with a rotated password updates it.
        as_user("admin", admin_password)
        assert jobs_user.ensure_jobs_user(url, "bertflow-jobs", second) == "updated"
        as_user("bertflow-jobs", first)
        with pytest.raises(MlflowException, match="(?i)401|unauthori|credentials"):
            mlflow.MlflowClient(url).get_experiment(experiment)
        as_user("bertflow-jobs", second)
        assert mlflow.MlflowClient(url).get_experiment(experiment).name == "bert-base"
    finally:
        server.stop_server(proc)
