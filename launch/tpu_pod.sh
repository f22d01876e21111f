#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: installs the package on every worker, then starts the same
# command on all of them (one process per host; jax.distributed finds its peers from the TPU metadata).
#
#   TPU_NAME=v2flow-v5p-64 ZONE=us-east5-a BUCKET=gs://my-bucket \
#   CONFIG=configs/tok256.py EXTRA="--config.vocabulary.checkpoint=/mnt/llama2" launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG="${CONFIG:-configs/tok256.py}"
RUN="${RUN:-$(basename "${CONFIG%.py}")}"
REPO="${REPO:-$(git rev-parse --show-toplevel)}"

gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$REPO" "$TPU_NAME":~/v2flow_jax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; cd ~/v2flow_jax
  python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]'
  nohup python3 -m v2flow_jax.main --jax_distributed --config=$CONFIG --workdir=$BUCKET/v2flow/$RUN \
      --config.data.tfds_data_dir=$BUCKET/tfds ${EXTRA:-} > ~/v2flow_$RUN.log 2>&1 &
"
echo "started $RUN on $TPU_NAME; logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/v2flow_$RUN.log'"
