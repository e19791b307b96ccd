"""Before a job goes to a Ray cluster: can the cluster's Python run bertflow at all?

A job's entrypoint runs with whatever `python` the cluster's job runner finds (the head's
PATH, e.g. a system Python when `ray start` was run without the venv activated). Without
bertflow's dependencies the job dies minutes later with a bare ModuleNotFoundError. The
probe submits a one-line job with the same runtime environment that imports the
dependencies and reports what is missing, so `bertflow submit` can say what to install
where before submitting the real job.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from typing import TYPE_CHECKING, Any

from bert_core.config_io import BertflowError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# What a bertflow job imports (import names, not package names).
REQUIRED_MODULES = ("torch", "safetensors", "numpy", "pyarrow", "tokenizers", "ray.train",
                    "ray.data", "mlflow", "yaml", "tqdm")
MARKER = "BERTFLOW_PROBE "
_PROBE = (
    "import importlib.util, json, sys\n"
    "missing = []\n"
    "for m in {modules!r}:\n"
    "    try:\n"
    "        ok = importlib.util.find_spec(m) is not None\n"
    "    except ModuleNotFoundError:\n"
    "        ok = False\n"
    "    if not ok:\n"
    "        missing.append(m)\n"
    "print({marker!r} + json.dumps({{'python': sys.executable, 'version': sys.version.split()[0],"
    " 'missing': missing}}), flush=True)\n"
)


class ClusterPythonError(BertflowError):
    """The cluster's Python cannot run bertflow jobs; the message says what to install."""


def probe_entrypoint(modules: tuple[str, ...] = REQUIRED_MODULES) -> str:
    """The probe job's shell command (the same `python` the real job will run)."""
    return shlex.join(["python", "-c", _PROBE.format(modules=list(modules), marker=MARKER)])


def parse_probe_logs(logs: str) -> dict[str, Any] | None:
    """The probe's report from its job log, or None when it printed none."""
    for line in reversed(logs.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER):])
            except json.JSONDecodeError:
                return None
    return None


def explain(address: str, status: str, report: dict[str, Any] | None, logs: str) -> str | None:
    """None when the cluster can run bertflow, else what is wrong and what to do."""
    fix = ("install bertflow's dependencies into the Python that runs Ray jobs on the head "
           "(`pip install -c constraints.txt -e .` in that environment), or start the head "
           "with the venv active (`.venv/bin/ray start --head ...` with .venv/bin on PATH)")
    if report is None:
        tail = "\n".join(logs.strip().splitlines()[-5:]) or "(no output)"
        return (f"the cluster at {address} could not run a Python probe job (status "
                f"{status}); its log ends with:\n{tail}\nThe job's `python` is missing or "
                f"broken: {fix}")
    if report.get("missing"):
        return (f"the cluster's Python ({report.get('python')}, {report.get('version')}) "
                f"cannot import {', '.join(report['missing'])}: {fix}")
    return None


_SECRET_NAME = re.compile(r"PASS|TOKEN|SECRET|KEY|CREDENTIAL|AUTH|^AWS_|^AZURE_|^GOOGLE_")


def probe_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """The probe's runtime env: the job's variables without any credential (store keys,
    MLflow user, password and token, the tracking URI, which may hold a password). The
    probe only imports modules; it needs none of them."""
    from data_prep.ray_env import MLFLOW_CREDENTIAL_ENV_VARS
    from data_prep.storage import CREDENTIAL_ENV_VARS

    drop = {*CREDENTIAL_ENV_VARS, *MLFLOW_CREDENTIAL_ENV_VARS, "MLFLOW_TRACKING_URI"}
    env = {k: v for k, v in runtime_env.get("env_vars", {}).items()
           if k not in drop and not _SECRET_NAME.search(k.upper())}
    return {**{k: v for k, v in runtime_env.items() if k != "env_vars"}, "env_vars": env}


def check_cluster_python(client: JobSubmissionClient, address: str,
                         runtime_env: dict[str, Any], timeout_s: float = 120.0,
                         poll_s: float = 0.5) -> dict[str, Any]:
    """Run the probe job (without credentials: `probe_runtime_env`); return its report, or
    raise ClusterPythonError saying what to fix."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=probe_entrypoint(),
                                       runtime_env=probe_runtime_env(runtime_env),
                                       metadata={"bertflow_verb": "probe"})
            break
        except RuntimeError as exc:  # a head that has just started has no job agent yet
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise ClusterPythonError(f"the cluster at {address} refused the probe job: "
                                         f"{exc}") from None
            time.sleep(1.0)
    status = "PENDING"
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(poll_s)
    else:
        client.stop_job(job_id)
        raise ClusterPythonError(f"the probe job {job_id} on {address} did not finish in "
                                 f"{timeout_s:.0f} s (status {status}); is the cluster busy? "
                                 "`--no-probe` skips this check")
    logs = client.get_job_logs(job_id)
    report = parse_probe_logs(logs)
    problem = explain(address, status, report, logs)
    if problem:
        raise ClusterPythonError(problem)
    return report or {}
