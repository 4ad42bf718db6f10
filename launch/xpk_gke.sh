#!/usr/bin/env bash
# Train on TPU slices in a GKE cluster with XPK (https://github.com/AI-Hypercomputer/xpk): one or
# more slices, data parallel across slices (mesh.dcn_data = --num-slices). See launch/README.md.
#
#   launch/xpk_gke.sh --project=my-project --zone=us-east5-a --cluster=llada --tpu-type=v5p-128 \
#     --num-slices=2 --workload=llada-vrpo --config=llada_8b_vrpo:v5p \
#     --workdir=gs://my-bucket/runs/llada-8b-vrpo -- --config.data.train_files=gs://my-bucket/pairs.jsonl ...
#
# XPK packs this checkout (--script-dir) into an image built on --base-docker-image (a JAX TPU
# image); the container installs the package, jax[tpu] at the pinned version and the GCS clients
# before training. With --docker-image the image must already hold all of that, with this checkout
# as its working directory. --dry-run prints the commands.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/xpk_gke.sh --project=ID --zone=ZONE --cluster=NAME --tpu-type=TYPE --workload=NAME
                         --config=RECIPE[:variant] --workdir=gs://BUCKET/PATH
                         [--num-slices=1] [--create-cluster] [--spot]
                         [--base-docker-image=IMAGE | --docker-image=IMAGE] [--xpk=xpk] [--dry-run]
                         [-- TRAIN_ARGS...]
EOF
}

die() {
  echo "launch/xpk_gke.sh: $*" >&2
  exit 2
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROJECT="" ZONE="" CLUSTER="" TPU_TYPE="" WORKLOAD="" CONFIG="" WORKDIR="" NUM_SLICES=1
CREATE_CLUSTER=0 SPOT=0 DOCKER_IMAGE="" XPK=xpk
BASE_DOCKER_IMAGE="us-docker.pkg.dev/cloud-tpu-images/jax-stable-stack/tpu:latest"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --cluster=*) CLUSTER="${1#*=}" ;;
    --tpu-type=*) TPU_TYPE="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --num-slices=*) NUM_SLICES="${1#*=}" ;;
    --base-docker-image=*) BASE_DOCKER_IMAGE="${1#*=}" ;;
    --docker-image=*) DOCKER_IMAGE="${1#*=}" ;;
    --xpk=*) XPK="${1#*=}" ;;
    --create-cluster) CREATE_CLUSTER=1 ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (flags take --name=value)" ;;
  esac
  shift
done

require_flags PROJECT ZONE CLUSTER TPU_TYPE WORKLOAD CONFIG WORKDIR
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices=$NUM_SLICES: expected a positive integer"
[[ $WORKDIR == gs://* ]] || die "--workdir=$WORKDIR: expected a gs:// path that every pod can reach"
recipe=${CONFIG%%:*}  # a file in the checkout, or a shipped recipe's name (llada_jax/configs/NAME.py)
[[ -f $REPO_DIR/$recipe || -f $REPO_DIR/llada_jax/configs/${recipe%.py}.py ]] || die "--config=$CONFIG: neither a file nor a shipped recipe in $REPO_DIR"

WHERE=(--project="$PROJECT" --zone="$ZONE")

if ((CREATE_CLUSTER)); then
  create=("$XPK" cluster create --cluster="$CLUSTER" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" "${WHERE[@]}")
  if ((SPOT)); then create+=(--spot); else create+=(--on-demand); fi
  run "${create[@]}"
fi

# The container's command: the same on every host of every slice. Slices are joined over the data
# center network, so they only exchange gradients: one data-parallel axis (dcn_data) across them.
train="python3 -m llada_jax.train --config=$(printf %q "$CONFIG") --config.workdir=$(printf %q "$WORKDIR")"
train+=" --config.distributed.initialize=auto --config.mesh.dcn_data=$NUM_SLICES"
for arg in "${TRAIN_ARGS[@]}"; do train+=" $(printf %q "$arg")"; done

workload=("$XPK" workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
          --num-slices="$NUM_SLICES" "${WHERE[@]}")
if [[ -n $DOCKER_IMAGE ]]; then
  workload+=(--docker-image="$DOCKER_IMAGE" --command="$train")
else
  workload+=(--base-docker-image="$BASE_DOCKER_IMAGE" --script-dir="$REPO_DIR"
             --command="pip install -q -U 'jax[tpu]>=0.10.2,<0.11' gcsfs google-cloud-storage -e . && $train")
fi
run "${workload[@]}"
echo "Follow it with: $XPK workload list --cluster=$CLUSTER --project=$PROJECT --zone=$ZONE"
