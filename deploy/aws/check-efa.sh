#!/usr/bin/env bash
# Fail a node's setup when EFA is not usable (cluster-8xgpu.yaml's worker_setup_commands):
# the node would join, and multi-node all-reduce would crawl over TCP instead.
set -euo pipefail
fi_info=/opt/amazon/efa/bin/fi_info
if [ ! -x "$fi_info" ]; then
    echo "bertflow: $fi_info missing: the image lacks the EFA software (use the Deep Learning Base AMI)" >&2
    exit 1
fi
if ! "$fi_info" -p efa -t FI_EP_RDM >/dev/null 2>&1; then
    echo "bertflow: no EFA device: the instance type has no EFA, or its NetworkInterfaces lack InterfaceType: efa" >&2
    exit 1
fi
n=$("$fi_info" -p efa -t FI_EP_RDM | grep -c 'domain:' || true)
echo "bertflow: EFA ready ($n RDM domain(s))"
