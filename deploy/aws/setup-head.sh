#!/usr/bin/env bash
# Set up the cluster head's services (run as root by cluster.yaml's head_setup_commands):
# PostgreSQL, the `mlflow` system user, the MLflow server as the systemd unit
# deploy/systemd/bertflow-mlflow.service, and the MLflow user jobs log as.
#
#   sudo bash deploy/aws/setup-head.sh s3://BUCKET
#
# Safe to run again (every `ray up` does): nothing is installed twice, systemd keeps a
# single server, and the server restarts only when its unit, settings, secrets or code
# changed. The region comes from the instance metadata (cluster.yaml names it once).
#
# Secrets: the SSM SecureString /bertflow/server-env (see docs/cluster.md) holds
#     MLFLOW_AUTH_ADMIN_PASSWORD=...   # the MLflow admin (user management only)
#     BERTFLOW_JOBS_PASSWORD=...       # the user jobs log as (MLFLOW_TRACKING_PASSWORD)
# It is read with the head's instance profile into /etc/bertflow/secrets.env (root, 0600);
# the server gets only the admin line (/etc/bertflow/server.env, root, 0600, read by systemd).
# PostgreSQL needs no password: the `mlflow` user logs in over the local socket (peer auth).
set -euo pipefail
umask 077   # files are private unless chmod-ed wider below

BUCKET=${1:?usage: setup-head.sh s3://BUCKET}
BUCKET=${BUCKET%/}
case "$BUCKET" in s3://?*) ;; *) echo "setup-head.sh: $BUCKET is not s3://BUCKET" >&2; exit 1 ;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(cd "$HERE/../.." && pwd)
SSM_PARAMETER=/bertflow/server-env
VENV=${BERTFLOW_PREFIX:-/opt/bertflow}/venv   # the tests point these three elsewhere
ETC=${BERTFLOW_ETC:-/etc/bertflow}
UNIT_DIR=${BERTFLOW_UNIT_DIR:-/etc/systemd/system}
UNIT=bertflow-mlflow.service
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || { echo "setup-head.sh: run as root (sudo)" >&2; exit 1; }
region=$(imds_region) || { echo "setup-head.sh: no instance metadata (not on EC2?)" >&2; exit 1; }
private_ip=$(hostname -I | awk '{print $1}')

# PostgreSQL (Ubuntu's package runs it as the `postgres` user, on 127.0.0.1 and its socket).
dpkg -s postgresql >/dev/null 2>&1 || apt_install postgresql
systemctl enable --now postgresql >/dev/null
id -u mlflow >/dev/null 2>&1 || \
    useradd --system --home-dir /var/lib/bertflow-mlflow --no-create-home --shell /usr/sbin/nologin mlflow
psql_q() { runuser -u postgres -- psql -qtAc "$1"; }
for _ in $(seq 60); do psql_q "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
psql_q "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'" | grep -q 1 || runuser -u postgres -- createuser mlflow
psql_q "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 || runuser -u postgres -- createdb -O mlflow mlflow

# Settings and secrets.
install -d -m 0755 "$ETC"
write_file() {  # write_file PATH MODE: stdin to PATH atomically; prints "changed" if it did
    local tmp; tmp=$(mktemp "$1.XXXXXX"); cat > "$tmp"; chmod "$2" "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; echo changed; fi
}
changes=""
"$VENV/bin/python" - "$SSM_PARAMETER" "$region" <<'EOF' > "$ETC/secrets.env.new"
import sys, boto3
value = boto3.client("ssm", region_name=sys.argv[2]).get_parameter(Name=sys.argv[1], WithDecryption=True)["Parameter"]["Value"]
names = {line.split("=", 1)[0].strip() for line in value.splitlines() if "=" in line}
missing = {"MLFLOW_AUTH_ADMIN_PASSWORD", "BERTFLOW_JOBS_PASSWORD"} - names
if missing:
    sys.exit(f"SSM parameter {sys.argv[1]} lacks {', '.join(sorted(missing))} (docs/cluster.md)")
print(value.strip())
EOF
changes+=$(write_file "$ETC/secrets.env" 0600 < "$ETC/secrets.env.new"); rm -f "$ETC/secrets.env.new"
changes+=$(grep '^MLFLOW_AUTH_ADMIN_' "$ETC/secrets.env" | write_file "$ETC/server.env" 0600)
changes+=$(printf 'BERTFLOW_SERVER_HOST=%s\nBERTFLOW_ARTIFACTS=%s/mlartifacts\nAWS_REGION=%s\nAWS_DEFAULT_REGION=%s\n' \
    "$private_ip" "$BUCKET" "$region" "$region" | write_file "$ETC/mlflow.env" 0644)
# What `ray start` on the head exports (head_start_ray_commands): not secret.
printf 'BERTFLOW_STORAGE_PATH=%s/runs\nAWS_REGION=%s\nAWS_DEFAULT_REGION=%s\nBERTFLOW_TRACKING_URI=http://%s:5000\n' \
    "$BUCKET" "$region" "$region" "$private_ip" | write_file "$ETC/cluster.env" 0644 >/dev/null

# The server, supervised by systemd: one instance, restarted on failure.
changes+=$(write_file "$UNIT_DIR/$UNIT" 0644 < "$PROJECT/deploy/systemd/$UNIT")
code=$(cd "$PROJECT" && find bert_core data_prep workflows -name '*.py' | sort | xargs cat | sha256sum | cut -c1-16)
changes+=$(echo "$code" | write_file "$ETC/server.code" 0644)
systemctl daemon-reload
systemctl enable "$UNIT" >/dev/null
if [ -n "$changes" ]; then systemctl restart "$UNIT"; else systemctl start "$UNIT"; fi

# The user jobs log as (never the admin).
set -a; . "$ETC/secrets.env"; set +a
(cd "$PROJECT" && "$VENV/bin/python" deploy/mlflow_jobs_user.py "http://$private_ip:5000")
echo "bertflow: MLflow server at http://$private_ip:5000 (systemctl status $UNIT)"
