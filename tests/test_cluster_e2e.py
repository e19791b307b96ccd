"""Two Ray nodes that share no disk, S3 (moto), PostgreSQL and an authenticated MLflow
server: the whole workflow through `bertflow submit`, and a node that dies mid-training;
then, on the same cluster, `bertflow jobs` and the errors of a cluster that cannot run a job
(one cluster for the module: starting one costs a minute on 2 cores).

The head (`--num-cpus 0`: the jobs' drivers and Ray Train's controller run there, no
training) shares this process's filesystem. The worker node runs in its own mount
namespace with a private /tmp, a private HOME and the test's folder hidden, so any path
that exists only where the driver runs fails there. Neither node gets credentials from its
environment: the AWS and MLflow variables reach the jobs only through `bertflow submit`'s
runtime environment. Needs root (mount namespaces) and PostgreSQL's server programs.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests import services
from tests.helpers import pydoc_text
from workflows.cli import main as cli

# ~5 min on an idle 2-core machine; the budget covers one shared with other work.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(2400)]

JOB_TIMEOUT_S = 600  # per job; minutes on an idle 2-core box, far more under load
# The tiny model takes tens of milliseconds a step: the run must go on long enough after
# its first checkpoint for the test to see that checkpoint and kill the node mid-run.
MAX_STEPS, CHECKPOINT_EVERY = 300, 20


class Cluster:
    """A head and one worker node in a private mount namespace; the node can be killed
    and replaced."""

    def __init__(self, work: Path, hidden: list[Path], storage_path: str):
        token = secrets.token_hex(32)
        # Ray >= 2.52: token auth; the node's private HOME hides ~/.ray/auth_token, so every
        # process gets the token in its environment.
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        self.headers = {"Authorization": f"Bearer {token}"}
        self.work, self.hidden, self.nodes = work, hidden, 0
        # As cluster.yaml does: the head names the shared storage of every training job.
        self.node_id = ""
        self.head = services.start_ray_head(
            num_cpus=0, env={**self.auth_env, **services.RAY_FAST_FAILURE_ENV,
                             "BERTFLOW_STORAGE_PATH": storage_path})
        self.node: subprocess.Popen | None = None

    def start_node(self, attempts: int = 3) -> None:
        """Start a worker node in a fresh namespace and wait until the cluster counts it
        alive. On a loaded machine `ray start` may time out registering with the GCS
        (30 s, fixed in Ray): its leftovers are killed and it is started again."""
        known = services.alive_node_ids(self.head.dashboard, self.headers)
        for attempt in range(1, attempts + 1):
            self.nodes += 1
            log = self.work / f"node{self.nodes}.log"
            self.node = services.start_ray_node_private(
                self.head.gcs_address, self.hidden, num_cpus=2, log=log,
                env={**self.auth_env, **services.RAY_FAST_FAILURE_ENV})
            try:
                self.node_id = services.wait_for_new_node(
                    self.head.dashboard, known, self.node, log, self.headers)
                return
            except RuntimeError:
                services.kill_node(self.node)
                if attempt == attempts:
                    raise

    def kill_node(self) -> int:
        """SIGKILL every process of the worker node; returns once the cluster counts it
        dead. Returns how many processes were killed."""
        killed = services.kill_node(self.node)
        services.wait_until_dead(self.head.dashboard, self.node_id, self.headers)
        return killed

    def node_sees(self, path: Path) -> bool:
        """Whether `path` exists inside the worker node's mount namespace."""
        return subprocess.run(["nsenter", f"--mount=/proc/{self.node.pid}/ns/mnt", "--",
                               "test", "-e", str(path)]).returncode == 0

    def stop(self) -> None:
        import shutil

        if self.node is not None:
            services.kill_node(self.node)
        services.stop_ray(self.head.proc)
        shutil.rmtree(self.head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_bucket(s3_server) -> str:
    """The module's bucket (the cluster's storage and the workflow's files)."""
    return s3_server.create_bucket(f"cluster-e2e-{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_bucket, team_mlflow):
    """The cluster; the worker node cannot see `cluster.work` (this module's folder)."""
    if os.geteuid() != 0:
        pytest.skip("the private-filesystem node needs root (mount namespaces)")
    if not services.jobs_api_installed():
        pytest.skip("Ray's Jobs API needs `pip install 'ray[default]'`")
    work = tmp_path_factory.mktemp("cluster")
    try:
        with services.cluster_lock(), pytest.MonkeyPatch.context() as env:
            c = Cluster(work, hidden=[work], storage_path=f"{s3_bucket}/runs")
            try:
                c.start_node()
                # This process is the submitter: it holds the cluster token and credentials.
                for key, value in {**c.auth_env, **team_mlflow.client_env}.items():
                    env.setenv(key, value)
                yield c
            finally:
                c.stop()
    finally:  # the next local Ray of this xdist worker gets a token of its own
        services.forget_ray_auth()


def submit(cluster: Cluster, verb: str, *args: str, wait: bool = True, probe: bool = False,
           capsys=None, submission_id: str | None = None) -> str:
    """`bertflow submit VERB ARGS --dashboard-url DASHBOARD [--wait]`; returns its output and
    fails with the job's log tail unless it exits 0."""
    flags = ["--dashboard-url", cluster.head.dashboard, "--submission-id",
             submission_id or f"e2e-{verb}-{secrets.token_hex(3)}"]
    flags += ["--wait", "--timeout", str(JOB_TIMEOUT_S)] if wait else []
    flags += [] if probe else ["--no-probe"]
    code = cli(["submit", verb, *flags, *args])
    out, err = capsys.readouterr()
    assert code == 0, f"bertflow submit {verb} exited {code}:\n{out[-4000:]}\n{err[-4000:]}"
    return out


def s3_objects(prefix_uri: str) -> dict[str, int]:
    import boto3

    bucket, _, prefix = prefix_uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    found, token = {}, None
    while True:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix,
                                  **({"ContinuationToken": token} if token else {}))
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]


def put_s3(uri: str, text: str) -> str:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=bucket, Key=key, Body=text.encode())
    return uri


def get_s3(uri: str) -> str:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(
        Bucket=bucket, Key=key)["Body"].read().decode()


def task_csv(rows: range) -> str:
    """seq-cls rows: a sentence about numbers or about text (label num / txt)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for i in rows:
        if i % 2:
            writer.writerow([f"the integer {i} plus {i + 3} is a number", "num"])
        else:
            writer.writerow([f"the string word{i} is joined to other text", "txt"])
    return out.getvalue()


def test_workflow_on_two_nodes_without_a_shared_disk_survives_a_node_death(
        cluster, s3_bucket, team_mlflow, capsys):
    from mlflow.tracking import MlflowClient

    from workflows.ops import jobs, registry

    bucket = s3_bucket
    started = time.monotonic()
    # The worker node cannot see this module's folder; the head (like the driver) can.
    (cluster.work / "driver-only.txt").write_text("only here")
    assert not cluster.node_sees(cluster.work / "driver-only.txt")
    assert cluster.node_sees(Path(services.VENV_BIN) / "python")

    # 1. prep: corpus on S3 -> dataset on S3 (the vocabulary is trained on the corpus).
    corpus = put_s3(f"{bucket}/corpus/pydoc.txt", pydoc_text(30))
    data = f"{bucket}/datasets/pydoc64"
    prep_id = f"e2e-prep-{secrets.token_hex(3)}"
    out = submit(cluster, "prep", "--input", corpus, "--output", data, "--train-vocab", "800",
                 "--max-seq-len", "64", "--dupe-factor", "1", submission_id=prep_id,
                 probe=True, capsys=capsys)
    assert f"job {prep_id} SUCCEEDED" in out  # submit --wait streams the logs, ends on it
    # No credential value was printed, only the names of the variables passed.
    assert "AWS_SECRET_ACCESS_KEY" in out and os.environ["AWS_SECRET_ACCESS_KEY"] not in out
    assert team_mlflow.password not in out
    assert f"{data.removeprefix(f'{bucket}/')}/manifest.json" in {
        k for k in s3_objects(data)}
    # The job is visible to `bertflow jobs`.
    assert cli(["jobs", "status", prep_id, "--dashboard-url", cluster.head.dashboard]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert cli(["jobs", "list", "--dashboard-url", cluster.head.dashboard]) == 0
    listing = capsys.readouterr().out
    assert prep_id in listing and "prep" in listing

    # 2. pretrain on S3 data, checkpoints on S3; the worker node is killed mid-run.
    runs = f"{bucket}/runs"
    out = submit(cluster, "pretrain", "--data", data, "--storage-path", runs,
                 "--run-name", "e2e-pretrain", "--model-size", "tiny", "--max-steps",
                 str(MAX_STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
                 "--max-failures", "2", "--warmup-steps", "5", "--batch-size", "16",
                 "--log-every", "5", "--eval-every", "0", "--no-log-system-metrics",
                 "--register-as", "e2e-bert", wait=False, capsys=capsys)
    job_id = out.split("submitted job ", 1)[1].split(":", 1)[0]
    client = jobs.connect(cluster.head.dashboard)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # Kill once Ray Train has committed a checkpoint (uploaded and recorded in its snapshot
    # on S3); an object that merely appeared may belong to an upload still in flight.
    from workflows.run_folder import committed_by_ray

    while not committed_by_ray(f"{runs}/e2e-pretrain"):
        status = jobs.job_status(client, job_id)
        assert status not in jobs.TERMINAL, (
            f"pretrain job {status} before its first checkpoint:\n{jobs.log_tail(client, job_id, 60)}")
        assert time.monotonic() < deadline, "no checkpoint on S3 in time"
        time.sleep(0.5)
    assert jobs.job_status(client, job_id) == "RUNNING"
    killed = cluster.kill_node()
    mlflow = MlflowClient(team_mlflow.url)
    logged = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                filter_string="attributes.run_name = 'e2e-pretrain'")
    step_at_kill = max((m.step for r in logged for m in
                        mlflow.get_metric_history(r.info.run_id, "train_loss")), default=-1)
    assert killed >= 3  # raylet, its agents and the Train worker(s)
    cluster.start_node()  # a fresh machine: new namespace, empty /tmp and HOME
    status = jobs.wait_for_job(client, job_id, stream=False, timeout_s=JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", jobs.log_tail(client, job_id, 80)

    pre_runs = mlflow.search_runs(
        [e.experiment_id for e in mlflow.search_experiments()],
        filter_string="attributes.run_name = 'e2e-pretrain'")
    assert len(pre_runs) == 1, "the restarted workers logged into a new run"
    run = pre_runs[0]
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == str(MAX_STEPS)
    attempts = mlflow.get_metric_history(run.info.run_id, "attempt")
    assert max(m.value for m in attempts) >= 1, (
        f"the run never restarted: training had reached step {step_at_kill} of {MAX_STEPS} "
        f"when the node was killed")
    resumed_at = max(m.step for m in attempts)
    assert resumed_at > 0 and resumed_at % CHECKPOINT_EVERY == 0  # from a checkpoint
    losses = mlflow.get_metric_history(run.info.run_id, "train_loss")
    assert max(m.step for m in losses) == MAX_STEPS
    info = registry.show_model("e2e-bert", team_mlflow.url)  # lineage: run and dataset
    assert info["version"] == "1" and info["run_name"] == "e2e-pretrain"
    assert info["dataset_path"] == data

    # 3. fine-tune from the registered model, task files on S3; no --storage-path: the
    #    head's BERTFLOW_STORAGE_PATH is the default.
    train = put_s3(f"{bucket}/task/train.csv", task_csv(range(32)))
    evals = put_s3(f"{bucket}/task/eval.csv", task_csv(range(100, 112)))
    submit(cluster, "finetune", "--task", "seq-cls", "--base", "models:/e2e-bert@latest",
           "--train", train, "--eval", evals, "--epochs", "1", "--batch-size", "8",
           "--max-seq-len", "32", "--run-name", "e2e-finetune",
           "--no-log-system-metrics", "--register-as", "e2e-cls", capsys=capsys)
    assert any(k.split("/")[1] == "e2e-finetune" for k in s3_objects(runs))

    # 4. predict from S3 to S3 with the fine-tuned model.
    # Unlabelled input: an input that already has a `label` column fails (duplicate column
    # in Ray Data's block; a serving bug, not a cluster one).
    unlabelled = "\n".join(line.rsplit(",", 1)[0] for line in
                           task_csv(range(200, 206)).splitlines()) + "\n"
    inputs = put_s3(f"{bucket}/predict/in.csv", unlabelled)
    scored = f"{bucket}/predict/out.csv"
    submit(cluster, "predict", "--model", "models:/e2e-cls@latest", "--input", inputs,
           "--output", scored, capsys=capsys)
    rows = list(csv.DictReader(io.StringIO(get_s3(scored))))
    assert len(rows) == 6 and all(r.get("label") in ("num", "txt") for r in rows), rows[:2]

    # 5. the registry, browsed through the authenticated server.
    assert cli(["registry", "list", "--tracking-uri", team_mlflow.url]) == 0
    listing = capsys.readouterr().out
    assert "e2e-bert" in listing and "e2e-cls" in listing
    print(f"cluster workflow: {time.monotonic() - started:.0f} s, node killed with "
          f"{killed} processes, resumed at step {resumed_at}")


def test_unknown_job_and_unreachable_cluster_are_clear_errors(cluster, capsys):
    assert cli(["jobs", "status", "no-such-job", "--dashboard-url", cluster.head.dashboard]) == 2
    assert "no-such-job" in capsys.readouterr().err
    port = services.free_ports(1)[0]
    assert cli(["jobs", "list", "--dashboard-url", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_cluster_python_without_bertflow_is_caught_before_submitting(cluster, capsys):
    """A head whose `python` lacks bertflow's dependencies (here: a PATH without the venv)
    is refused before the job is shipped, saying what to install where; a job that fails
    on the cluster ends with the last lines of its log and the command for all of it."""
    import sys

    from workflows.ops import jobs
    from workflows.ops.probe import ClusterPythonError, check_cluster_python

    dashboard, venv = cluster.head.dashboard, services.VENV_BIN
    client = jobs.connect(dashboard)
    report = check_cluster_python(client, dashboard, {"env_vars": {
        "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}"}})
    assert report["missing"] == [] and report["python"].startswith(str(venv))
    # a head whose `python` is the system interpreter, without bertflow's dependencies
    bare = cluster.work / "bare-bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.base_prefix + "/bin/python3")
    with pytest.raises(ClusterPythonError, match="cannot import torch.*pip install -c "
                                                 "constraints.txt"):
        check_cluster_python(client, dashboard, {"env_vars": {
            "PATH": f"{bare}{os.pathsep}/usr/bin{os.pathsep}/bin"}})

    missing = cluster.work / "no-such-corpus.txt"
    code = cli(["submit", "prep", "--dashboard-url", dashboard, "--wait", "--timeout",
                str(JOB_TIMEOUT_S), "--submission-id", "bertflow-test-fails",
                "--input", str(missing), "--output", str(cluster.work / "out"),
                "--vocab", str(cluster.work / "no-vocab.txt")])
    out, err = capsys.readouterr()
    assert code == 1 and "job bertflow-test-fails FAILED" in out
    assert "last lines of its log" in err and "no-such-corpus" in err.split(
        "last lines of its log", 1)[1]
    assert f"bertflow jobs logs bertflow-test-fails --dashboard-url {dashboard}" in err
