#!/usr/bin/env bash
# Trains on all GPUs of one machine from one process: the step is pmap'd (or
# shard_map'd with --config.parallel=shard_map) over the local GPUs and the
# global batch (train.batch_size) is split between them.
#
# Needs: a CUDA build of JAX (pip install -U "jax[cuda12]"), the GPUs listed
# by nvidia-smi.
#
#   launch/local_multi_gpu.sh configs/cifar_resnet18.py runs/r18_cifs [--config.k=v ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/local_multi_gpu.sh configs/cifar_resnet18.py runs/r18_cifs
#
# What to change: CUDA_VISIBLE_DEVICES picks the GPUs; train.batch_size and
# eval.batch_size are global and must be multiples of the number of GPUs;
# JAX_PLATFORMS=rocm for AMD GPUs. Running it again with the same workdir
# resumes the run.
set -euo pipefail
usage="usage: launch/local_multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "GPUs: $(nvidia-smi -L | wc -l) on this machine," \
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>}" >&2
fi
# Fail rather than silently train on the CPU when no GPU is found.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
exec python -m cifs_jax.main --config="$config" --workdir="$workdir" "$@"
