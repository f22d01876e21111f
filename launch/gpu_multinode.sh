#!/usr/bin/env bash
# Multi-node GPU training, one process per node (all local GPUs per process), e.g. under SLURM:
#
#   srun --nodes=6 --ntasks-per-node=1 --gpus-per-node=8 \
#     env COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12355 \
#     launch/gpu_multinode.sh configs/tok1024.py /shared/runs/tok1024 --config.vocabulary.checkpoint=/shared/llama2
#
# Outside SLURM set NUM_PROCESSES and PROCESS_ID on each node. --dry-run (first argument) prints the
# command instead of running it. Install once per node image:
#   python -m pip install -U pip && pip install -e . "jax[cuda12]"
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir (shared filesystem or gs://)}"; shift 2
COORDINATOR="${COORDINATOR:?set COORDINATOR=host:port of process 0}"
NUM_PROCESSES="${SLURM_NNODES:-${NUM_PROCESSES:?set NUM_PROCESSES (or run under SLURM)}}"
PROCESS_ID="${SLURM_NODEID:-${PROCESS_ID:?set PROCESS_ID (or run under SLURM)}}"
cmd=(python -m v2flow_jax.main --jax_distributed --coordinator_address="$COORDINATOR"
     --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [ "$DRY_RUN" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
