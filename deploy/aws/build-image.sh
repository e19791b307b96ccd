#!/usr/bin/env bash
# Bake bertflow's node image (AMI): the pinned Deep Learning Base AMI plus the venv of
# deploy/aws/install-venv.sh, so nodes started from it install no dependency at all.
#
#   bash deploy/aws/build-image.sh [CLUSTER_YAML]     # from the repository root
#
# It reads the region and the bucket from CLUSTER_YAML (default cluster.yaml: the one place
# each is named), uploads the project's code to s3://BUCKET/bertflow-image-build/, starts one
# GPU instance (BUILD_INSTANCE_TYPE, default g5.xlarge, on-demand) from the base AMI with the
# bertflow-worker instance profile, lets it install the venv and check that torch sees its
# GPU, snapshots it as "bertflow-<stamp>-<date>", terminates it, and prints the new AMI id:
# put it in cluster.yaml (and cluster-8xgpu.yaml) under metadata.image. About 20-30 min;
# the instance costs what a g5.xlarge costs for that long, the AMI its snapshot's storage.
# Rebake when constraints.txt or pyproject.toml change (nodes still work meanwhile: they
# install what changed on their first start).
#
# Needs: the AWS CLI with rights to run/stop/terminate instances, create images and pass the
# bertflow-worker role (an admin or the person who runs `ray up`), and python3 with PyYAML
# (bertflow's own venv has it).
set -euo pipefail

# The pinned base image, by name (ids differ per region; the name is the same everywhere).
# To see the current ones in a region:
#   aws ec2 describe-images --region REGION --owners amazon --query \
#     'reverse(sort_by(Images,&CreationDate))[:5].[Name,ImageId]' --output text --filters \
#     'Name=name,Values=Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *'
BASE_AMI_NAME=${BASE_AMI_NAME:-"Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) 20261006"}
BUILD_INSTANCE_TYPE=${BUILD_INSTANCE_TYPE:-g5.xlarge}
CLUSTER_YAML=${1:-cluster.yaml}
PYTHON=${PYTHON:-python3}

read -r region bucket profile < <("$PYTHON" - "$CLUSTER_YAML" <<'EOF'
import re, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
setup = " ".join(cfg["head_setup_commands"])
bucket = re.search(r"setup-head\.sh\s+(s3://[^\s/]+)", setup).group(1)
worker = next(t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"])
print(cfg["provider"]["region"], bucket, worker["node_config"]["IamInstanceProfile"]["Name"])
EOF
)
case "$bucket" in *CHANGE*) echo "build-image.sh: set the bucket in $CLUSTER_YAML first" >&2; exit 1 ;; esac
aws() { command aws --region "$region" "$@"; }

base=$(aws ec2 describe-images --owners amazon --filters "Name=name,Values=$BASE_AMI_NAME" \
       --query 'Images[0].ImageId' --output text)
if [ "$base" = None ] || [ -z "$base" ]; then
    echo "build-image.sh: no AMI named '$BASE_AMI_NAME' in $region. Current ones:" >&2
    aws ec2 describe-images --owners amazon --output text \
        --filters 'Name=name,Values=Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *' \
        --query 'reverse(sort_by(Images,&CreationDate))[:5].[Name]' >&2
    echo "rerun with BASE_AMI_NAME='<one of them>'" >&2
    exit 1
fi
stamp=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-12)
build=$(date -u +%Y%m%d-%H%M%S)
prefix="$bucket/bertflow-image-build/$build"
echo "base $BASE_AMI_NAME ($base) in $region; code and result under $prefix"

tar czf - --exclude='__pycache__' bert_core data_prep workflows configs deploy \
    pyproject.toml constraints.txt README.md | aws s3 cp - "$prefix/project.tar.gz"
userdata=$(mktemp)
trap 'rm -f "$userdata"' EXIT
cat > "$userdata" <<EOF
#!/bin/bash
# bertflow image build: install the venv, report to S3, power off (the builder snapshots).
exec > /var/log/bertflow-image-build.log 2>&1
set -x
export AWS_DEFAULT_REGION=$region
mkdir -p /opt/bertflow/src && cd /opt/bertflow/src
if aws s3 cp "$prefix/project.tar.gz" - | tar xzf - && bash deploy/aws/install-venv.sh /opt/bertflow/src; then
    result=ok
else
    result=failed
fi
rm -rf /opt/bertflow/src
tail -n 40 /var/log/bertflow-image-build.log | sed "1i \$result" | aws s3 cp - "$prefix/result"
cloud-init clean --logs || true   # instances started from the image boot as new ones
shutdown -h now
EOF

instance=$(aws ec2 run-instances --image-id "$base" --instance-type "$BUILD_INSTANCE_TYPE" \
    --iam-instance-profile "Name=$profile" --user-data "file://$userdata" \
    --instance-initiated-shutdown-behavior stop \
    --block-device-mappings 'DeviceName=/dev/sda1,Ebs={VolumeSize=200,VolumeType=gp3}' \
    --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=bertflow-image-build}]" \
    --query 'Instances[0].InstanceId' --output text)
trap 'rm -f "$userdata"; aws ec2 terminate-instances --instance-ids "$instance" >/dev/null' EXIT
echo "build instance $instance: installing (20-30 min)"
for _ in $(seq 240); do
    state=$(aws ec2 describe-instances --instance-ids "$instance" \
            --query 'Reservations[0].Instances[0].State.Name' --output text)
    [ "$state" = stopped ] && break
    sleep 15
done
report=$(aws s3 cp "$prefix/result" - 2>/dev/null || echo "no result (state: $state)")
if [ "$(head -n1 <<<"$report")" != ok ]; then
    echo "build-image.sh: the build failed; the end of its log:" >&2
    echo "$report" >&2
    exit 1
fi
name="bertflow-$stamp-$build"
ami=$(aws ec2 create-image --instance-id "$instance" --name "$name" \
      --description "bertflow venv (constraints $stamp) on $BASE_AMI_NAME" \
      --tag-specifications "ResourceType=image,Tags=[{Key=bertflow:base,Value=$BASE_AMI_NAME},{Key=bertflow:constraints,Value=$stamp}]" \
      --query ImageId --output text)
aws ec2 wait image-available --image-ids "$ami"
echo "$ami   # $name: set metadata.image to this in $CLUSTER_YAML"
