# Shell helpers shared by the node scripts in deploy/aws/ (sourced, not run).
# Every function is safe to call again: `ray up` reruns the setup of a running node.

# Wait until the first boot is done with apt: cloud-init and unattended-upgrades hold the dpkg
# lock for minutes after an instance starts, and an `apt-get install` racing them fails with
# "Could not get lock /var/lib/dpkg/lock-frontend".
wait_for_apt() {
    if command -v cloud-init >/dev/null 2>&1; then
        timeout 900 cloud-init status --wait >/dev/null 2>&1 || true
    fi
    local waited=0
    while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
            >/dev/null 2>&1 || pgrep -x unattended-upgr >/dev/null 2>&1; do
        if [ "$waited" -ge 900 ]; then
            echo "bertflow: apt/dpkg still locked after 15 min (unattended-upgrades?)" >&2
            return 1
        fi
        sleep 5
        waited=$((waited + 5))
    done
}

# apt-get install PACKAGES..., after the first boot's apt work and a fresh package list.
# DPkg::Lock::Timeout makes apt itself wait should anything take the lock in between.
apt_install() {
    wait_for_apt
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@"
}

# The instance's region, from the instance metadata service (IMDSv2). The region is written
# once, in the cluster YAML's `provider.region`; nodes read it from where they run.
imds_region() {
    local token
    token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') || return 1
    curl -sf -H "X-aws-ec2-metadata-token: $token" \
        http://169.254.169.254/latest/meta-data/placement/region
}
