#!/usr/bin/env bash
# Trains on every accelerator of one machine: the step is pmap'd (or
# shard_map'd with --config.parallel=shard_map) over all local devices, and
# the global batch (train.batch_size) is split between them.
#
#   launch/single_host.sh configs/cifar_resnet18.py runs/r18_cifs [--config.k=v ...]
#
# Running it again with the same workdir resumes the run.
set -euo pipefail
config=${1:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
exec python -m cifs_jax.main --config="$config" --workdir="$workdir" "$@"
