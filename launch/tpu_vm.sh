#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: run it on every worker at once; each
# worker is one process, jax.distributed.initialize() finds the others from
# the TPU metadata (no addresses to set), and each feeds its own slice of
# every global batch to its local TPU cores.
#
# Needs: the repository and a TPU build of JAX (pip install -U "jax[tpu]") on
# every worker, and a WORKDIR every worker sees at the same path (e.g. a
# Filestore/NFS or gcsfuse mount; gs:// URLs are not supported for
# config.json and the metric files).
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd cifs_jax && launch/tpu_vm.sh configs/cifar_resnet18.py /mnt/runs/r18_cifs"
#
# What to change: NAME, ZONE and the paths above; train.batch_size is global:
# a multiple of the number of TPU cores of the slice (e.g. 128 = 8 x 16 on a
# v4-32). On a single TPU VM (one worker) --distributed=auto is harmless.
# Resume: run the same command on all workers again. Process 0's output is
# what the ssh session of worker 0 shows.
set -euo pipefail
usage="usage: launch/tpu_vm.sh CONFIG WORKDIR [--config.key=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
exec python -m cifs_jax.main --config="$config" --workdir="$workdir" \
  --distributed=auto "$@"
