"""Create (or update) the MLflow user that jobs log as: not the admin.

Run by deploy/aws/setup-head.sh on an AWS head (as root) and by the `bertflow-mlflow-users`
Job of deploy/kuberay/mlflow.yaml, with the server's secrets in the
environment (never on a command line):

    MLFLOW_AUTH_ADMIN_PASSWORD=...  BERTFLOW_JOBS_PASSWORD=...  \\
        /opt/bertflow/venv/bin/python deploy/mlflow_jobs_user.py http://10.0.0.5:5000

The admin authenticates (MLFLOW_AUTH_ADMIN_USERNAME, default `admin`). The jobs user
(BERTFLOW_JOBS_USERNAME, default `bertflow-jobs`) is created when missing, and otherwise
gets the password now in the secrets (so rotating it in SSM and rerunning `ray up` applies
it); it is never an admin. MLflow's basic-auth app gives every user READ on what others
made and MANAGE on the experiments and registered models it creates, so jobs can log runs
and register models but cannot change users or permissions.
"""

from __future__ import annotations

import os
import sys

DEFAULT_JOBS_USER = "bertflow-jobs"


def ensure_jobs_user(tracking_uri: str, username: str, password: str) -> str:
    """Make `username` a non-admin user with `password` on the server at `tracking_uri`,
    authenticating as the admin of this process's MLFLOW_TRACKING_USERNAME/PASSWORD.
    Returns "created" or "updated"."""
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    if not password:
        raise SystemExit("BERTFLOW_JOBS_PASSWORD is empty: add it to the server's secrets")
    client = AuthServiceClient(tracking_uri)
    try:
        user = client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)
    if user.is_admin:
        client.update_user_admin(username, False)
    return "updated"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from workflows.ops.server import wait_for_server

    tracking_uri = argv[0]
    wait_for_server(tracking_uri, timeout_s=180)
    os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    username = os.environ.get("BERTFLOW_JOBS_USERNAME", DEFAULT_JOBS_USER)
    done = ensure_jobs_user(tracking_uri, username, os.environ.get("BERTFLOW_JOBS_PASSWORD", ""))
    print(f"bertflow: MLflow user {username!r} {done} (not an admin)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
