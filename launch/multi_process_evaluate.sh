#!/usr/bin/env bash
# Evaluates a run's checkpoint with N processes on one machine, one per GPU
# by default, on JAX's distributed runtime (python -m cifs_jax.evaluate on
# every process; each attacks its rows of every batch, process 0 writes the
# reports). The workdir is only read.
#
# Needs: bash >= 5.1, a CUDA build of JAX and N GPUs (or, to try it without
# GPUs, the CPU: GPUS_PER_PROCESS=0 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2).
#
#   launch/multi_process_evaluate.sh 4 runs/r18_cifs [--checkpoint=best --protocol=strong ...]
#
# What to change: GPUS_PER_PROCESS, PORT and STOP_GRACE_S as for
# launch/multi_process_local.sh; --batch_size (default eval.batch_size) is
# global: a multiple of the number of devices of all processes. Process 0
# prints to the terminal, the others log to OUTPUT/process<i>.log (OUTPUT:
# the --output directory if given as --output=DIR, else the workdir).
set -euo pipefail
usage="usage: launch/multi_process_evaluate.sh NUM_PROCESSES WORKDIR [evaluate's flags ...]"
num_processes=${1:?$usage}
workdir=${2:?$usage}
shift 2
log_dir=$workdir
for flag in "$@"; do
  if [[ $flag == --output=* ]]; then
    log_dir=${flag#--output=}
    mkdir -p "$log_dir"
  fi
done
# shellcheck source=launch/processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/processes.sh"
run_processes "$num_processes" "$log_dir" python -m cifs_jax.evaluate \
  --workdir="$workdir" "$@"
