#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse one), install llada_jax on every worker, and run
# the same training command on all workers at once. See launch/README.md.
#
#   launch/tpu_pod.sh --project=my-project --zone=us-east5-a --name=llada-sft \
#     --accelerator-type=v5p-128 --config=llada_8b_sft:v5p \
#     --workdir=gs://my-bucket/runs/llada-8b-sft --source=https://github.com/me/llada_jax.git@main \
#     -- --config.data.train_files=gs://my-bucket/sft/train.jsonl \
#        --config.data.tokenizer=gs://my-bucket/llada-8b/tokenizer.json \
#        --config.checkpoint.init_from=gs://my-bucket/llada-8b-base/checkpoints
#
# Everything after `--` is passed to `python -m llada_jax.train`. --dry-run prints the commands
# instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --project=ID --zone=ZONE --name=TPU_NAME --accelerator-type=TYPE
                         --config=RECIPE[:variant] --workdir=gs://BUCKET/PATH
                         [--source=GIT_URL[@REF] | --source=LOCAL_DIR] [--runtime-version=VERSION]
                         [--reuse] [--spot] [--skip-install] [--detach] [--python=python3] [--dry-run]
                         [-- TRAIN_ARGS...]

  --accelerator-type  e.g. v5p-128 (64 chips), v5litepod-256, v4-64, v6e-256
  --runtime-version   TPU VM image; default from the accelerator type (v5p: v2-alpha-tpuv5)
  --source            where workers get the code: a git URL (optionally @branch/tag/commit), or a
                      local checkout that is packed and copied to every worker (default: this checkout)
  --reuse             use an existing TPU VM named --name instead of creating one
  --spot              create a Spot TPU VM (preemptible; the run resumes from its last checkpoint)
  --skip-install      do not install; the workers already have ~/llada_jax
  --detach            run training in the background on the workers (log: ~/llada_train.log)
  --dry-run           print the commands without running them
EOF
}

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROJECT="" ZONE="" NAME="" ACCELERATOR_TYPE="" RUNTIME_VERSION="" CONFIG="" WORKDIR=""
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="$REPO_DIR" REUSE=0 SPOT=0 SKIP_INSTALL=0 DETACH=0 PYTHON=python3
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --source=*) SOURCE="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --reuse) REUSE=1 ;;
    --spot) SPOT=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (flags take --name=value)" ;;
  esac
  shift
done

require_flags PROJECT ZONE NAME CONFIG WORKDIR
((REUSE)) || [[ -n $ACCELERATOR_TYPE ]] || die "--accelerator-type is required to create a TPU VM (or pass --reuse)"
[[ $WORKDIR == gs://* ]] || die "--workdir=$WORKDIR: expected a gs:// path that every worker can reach"
recipe=${CONFIG%%:*}  # a file in the checkout, or a shipped recipe's name (llada_jax/configs/NAME.py)
[[ -f $REPO_DIR/$recipe || -f $REPO_DIR/llada_jax/configs/${recipe%.py}.py ]] || die "--config=$CONFIG: neither a file nor a shipped recipe in $REPO_DIR"

if [[ -z $RUNTIME_VERSION ]]; then
  case "$ACCELERATOR_TYPE" in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

# 1. The slice.
if ((REUSE)); then
  run "${GCLOUD_TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
else
  create=("${GCLOUD_TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  if ((SPOT)); then create+=(--spot); fi
  run "${create[@]}"
fi

# 2. The code and its dependencies on every worker (jax[tpu] brings libtpu; gcsfs and
#    google-cloud-storage let etils.epath and Orbax reach gs:// paths).
PIP_PACKAGES="'jax[tpu]>=0.10.2,<0.11' gcsfs google-cloud-storage"
if ((SKIP_INSTALL == 0)); then
  if [[ -d $SOURCE ]]; then
    archive="${TMPDIR:-/tmp}/llada_jax_src.tar.gz"
    run tar -czf "$archive" -C "$SOURCE" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=__pycache__ .
    run "${GCLOUD_TPU[@]}" scp "$archive" "$NAME:~/llada_jax_src.tar.gz" --worker=all "${WHERE[@]}"
    fetch="rm -rf ~/llada_jax && mkdir -p ~/llada_jax && tar -xzf ~/llada_jax_src.tar.gz -C ~/llada_jax"
  else
    # URL@REF: a branch, tag or commit after the last '@' (not the user@host of an ssh URL).
    url="$SOURCE" ref=""
    if [[ $SOURCE == *@* && ${SOURCE##*@} != *[/:]* ]]; then url="${SOURCE%@*}" ref="${SOURCE##*@}"; fi
    fetch="rm -rf ~/llada_jax && git clone $(printf %q "$url") ~/llada_jax"
    if [[ -n $ref ]]; then fetch+=" && git -C ~/llada_jax checkout $(printf %q "$ref")"; fi
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" --worker=all "${WHERE[@]}" \
    --command="set -e; $fetch && $PYTHON -m pip install -q -U $PIP_PACKAGES -e ~/llada_jax"
fi

# 3. The same command on every worker; JAX finds the other workers itself (distributed.initialize=auto).
train="cd ~/llada_jax && $PYTHON -m llada_jax.train --config=$(printf %q "$CONFIG")"
train+=" --config.workdir=$(printf %q "$WORKDIR") --config.distributed.initialize=auto"
for arg in "${TRAIN_ARGS[@]}"; do train+=" $(printf %q "$arg")"; done
if ((DETACH)); then
  train="nohup bash -c $(printf %q "$train") > ~/llada_train.log 2>&1 &"
fi
run "${GCLOUD_TPU[@]}" ssh "$NAME" --worker=all "${WHERE[@]}" --command="$train"

if ((DETACH)); then
  echo "Training runs in the background; follow it with:"
  echo "  ${GCLOUD_TPU[*]} ssh $NAME --worker=0 ${WHERE[*]} --command='tail -f ~/llada_train.log'"
fi
