#!/usr/bin/env bash
# Evaluates a run's checkpoint on a Cloud TPU VM or pod slice: run it on every
# worker at once, as launch/tpu_vm.sh (what it needs, how processes find each
# other); each worker attacks its rows of every batch, worker 0 writes the
# reports. The WORKDIR is only read.
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd cifs_jax && launch/tpu_vm_evaluate.sh /mnt/runs/r18_cifs --checkpoint=best"
#
# --batch_size (default eval.batch_size) is global: a multiple of the number
# of TPU cores of the slice.
set -euo pipefail
usage="usage: launch/tpu_vm_evaluate.sh WORKDIR [evaluate's flags ...]"
workdir=${1:?$usage}
shift
exec python -m cifs_jax.evaluate --workdir="$workdir" --distributed=auto "$@"
