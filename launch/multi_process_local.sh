#!/usr/bin/env bash
# Trains with N processes on one machine, one per GPU by default, on JAX's
# distributed runtime: process 0 hosts the coordinator on 127.0.0.1:PORT and
# every process feeds its own slice of each global batch.
#
# Needs: bash >= 5.1, a CUDA build of JAX and N GPUs (or, to try it without
# GPUs, the CPU: GPUS_PER_PROCESS=0 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2).
#
#   launch/multi_process_local.sh 4 configs/cifar_resnet18.py runs/r18_cifs [--config.k=v ...]
#   GPUS_PER_PROCESS=0 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 \
#     launch/multi_process_local.sh 2 configs/fmnist_resnet10.py:smoke /tmp/smoke
#
# What to change: GPUS_PER_PROCESS (default 1; process i sees GPUs
# i*G .. i*G+G-1 through CUDA_VISIBLE_DEVICES; 0 leaves it unset), PORT (a
# free port, default 12355). train.batch_size is global: a multiple of the
# number of devices of all processes. Process 0 prints to the terminal, the
# others log to WORKDIR/process<i>.log. When one process fails or is killed,
# the script stops the others at once (SIGTERM, SIGKILL after STOP_GRACE_S,
# default 10 s) and names it; so does Ctrl-C. Running the same command again
# resumes from the last checkpoint.
set -euo pipefail
usage="usage: launch/multi_process_local.sh NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]"
num_processes=${1:?$usage}
config=${2:?$usage}
workdir=${3:?$usage}
shift 3
mkdir -p "$workdir"
# shellcheck source=launch/processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/processes.sh"
run_processes "$num_processes" "$workdir" python -m cifs_jax.main \
  --config="$config" --workdir="$workdir" "$@"
