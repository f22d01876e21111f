#!/usr/bin/env bash
# Train on Cloud TPU VMs: copies the repo to every worker of every slice, installs it with jax[tpu],
# then starts the same command on all workers at once (one process per host; jax.distributed finds its
# peers from the TPU metadata, and across slices from the MEGASCALE variables the TPU runtime sets).
#
#   TPU_NAME=v2flow-v5p-128 ZONE=us-east5-a BUCKET=gs://my-bucket CONFIG=configs/tok256.py \
#     EXTRA="--config.vocabulary.checkpoint=/mnt/llama2" launch/tpu_pod.sh [--dry-run] [--slices=N]
#
# --slices=N: a multi-slice queued resource whose nodes are $TPU_NAME-0 .. $TPU_NAME-(N-1); give the
# config a mesh whose config.plan.dcn_axis (default 'data') spans the slices (check with mode=plan).
# --dry-run: print every command instead of running it.
set -euo pipefail
DRY_RUN=0; SLICES=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --slices=*) SLICES="${arg#--slices=}" ;;
    *) echo "launch/tpu_pod.sh: unknown argument $arg (use --dry-run, --slices=N)" >&2; exit 2 ;;
  esac
done
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG="${CONFIG:-configs/tok256.py}"
RUN="${RUN:-$(basename "${CONFIG%.py}")}"
REPO="${REPO:-$(git rev-parse --show-toplevel)}"
LOG="\$HOME/v2flow_$RUN.log"

run() {   # prints the command with --dry-run, runs it otherwise
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$SLICES" = 1 ]; then NODES=("$TPU_NAME"); else NODES=(); for i in $(seq 0 $((SLICES - 1))); do NODES+=("$TPU_NAME-$i"); done; fi
Q_CONFIG=$(printf %q "$CONFIG"); Q_WORKDIR=$(printf %q "$BUCKET/v2flow/$RUN"); Q_TFDS=$(printf %q "$BUCKET/tfds")
# Install everywhere first, start everywhere after: a slice still installing would leave the others'
# jax.distributed.initialize waiting past its timeout.
INSTALL="set -e; cd ~/v2flow_jax; python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]'"
START="cd ~/v2flow_jax; nohup python3 -m v2flow_jax.main --jax_distributed --config=$Q_CONFIG --workdir=$Q_WORKDIR \
 --config.data.tfds_data_dir=$Q_TFDS ${EXTRA:-} > $LOG 2>&1 < /dev/null &"
for node in "${NODES[@]}"; do
  # scp into an existing folder would nest the new copy inside the old one: replace it.
  run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="rm -rf ~/v2flow_jax"
  run gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$REPO" "$node":~/v2flow_jax
  run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$INSTALL"
done
for node in "${NODES[@]}"; do   # every slice must start: the processes wait for each other
  run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$START"
done
[ "$DRY_RUN" = 1 ] && echo "(dry run: nothing was started)"
echo "$([ "$DRY_RUN" = 1 ] && echo "would start" || echo started) $RUN on ${NODES[*]}; logs (worker 0 of the first slice holds the metrics lines):"
echo "  gcloud compute tpus tpu-vm ssh ${NODES[0]} --zone=$ZONE --worker=0 --command='tail -f $LOG'"
