#!/usr/bin/env bash
# Trains with N processes on one machine, one per GPU by default, on JAX's
# distributed runtime: process 0 hosts the coordinator on 127.0.0.1:PORT and
# every process feeds its own slice of each global batch.
#
# Needs: a CUDA build of JAX and N GPUs (or, to try it without GPUs, the CPU:
# GPUS_PER_PROCESS=0 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2).
#
#   launch/multi_process_local.sh 4 configs/cifar_resnet18.py runs/r18_cifs [--config.k=v ...]
#   GPUS_PER_PROCESS=0 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 \
#     launch/multi_process_local.sh 2 configs/fmnist_resnet10.py:smoke /tmp/smoke
#
# What to change: GPUS_PER_PROCESS (default 1; process i sees GPUs
# i*G .. i*G+G-1 through CUDA_VISIBLE_DEVICES; 0 leaves it unset), PORT (a
# free port, default 12355). train.batch_size is global: a multiple of the
# number of devices of all processes. Process 0 prints to the terminal, the
# others log to WORKDIR/process<i>.log. Ctrl-C stops all of them; running the
# same command again resumes from the last checkpoint.
set -euo pipefail
usage="usage: launch/multi_process_local.sh NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]"
num_processes=${1:?$usage}
config=${2:?$usage}
workdir=${3:?$usage}
shift 3
gpus_per_process=${GPUS_PER_PROCESS:-1}
port=${PORT:-12355}
mkdir -p "$workdir"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM

for ((i = 0; i < num_processes; i++)); do
  env_args=()
  if ((gpus_per_process > 0)); then
    first=$((i * gpus_per_process))
    env_args=("CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + gpus_per_process - 1)))")
  fi
  command=(env "${env_args[@]}" python -m cifs_jax.main
    --config="$config" --workdir="$workdir"
    --distributed=explicit --coordinator_address="127.0.0.1:$port"
    --num_processes="$num_processes" --process_id="$i" "$@")
  if ((i == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"$workdir/process$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
