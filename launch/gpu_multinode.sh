#!/usr/bin/env bash
# Multi-node GPU training, one process per node (all local GPUs per process), e.g. under SLURM:
#
#   srun --nodes=6 --ntasks-per-node=1 --gpus-per-node=8 \
#     env COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12355 \
#     launch/gpu_multinode.sh configs/tok1024.py /shared/runs/tok1024 --config.vocabulary.checkpoint=/shared/llama2
#
# Install once per node image: python -m pip install -U pip && pip install -e . "jax[cuda12]"
set -euo pipefail
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir (shared filesystem or gs://)}"; shift 2
export JAX_COORDINATOR_ADDRESS="${COORDINATOR:?set COORDINATOR=host:port of process 0}"
export JAX_NUM_PROCESSES="${SLURM_NNODES:-${NUM_PROCESSES:?}}"
export JAX_PROCESS_ID="${SLURM_NODEID:-${PROCESS_ID:?}}"
exec python -m v2flow_jax.main --jax_distributed --config="$CONFIG" --workdir="$WORKDIR" "$@"
