#!/usr/bin/env bash
# docs/results.md's runs, start to end: trains the four Fashion-MNIST models,
# evaluates them and writes the report. Resumable: run it again after an
# interruption and every step goes on where it stopped (training from its
# last checkpoint, an evaluation from its partial results; finished
# reports are kept).
#
#   docs/results_runs/run_all.sh RUNS_DIR [train|evaluate|report|save|restore]...
#
# (default: train evaluate report). Two lanes run side by side, each on one
# core of a 2-core CPU (taskset), since two processes on one core each
# train about 15 % faster together than one process on both.
#   save:    copies each run's small files (config.json, metrics.jsonl,
#            eval_*, partial results, its log without progress bars) and
#            its latest checkpoint into
#            docs/results_runs/<run>/, to commit: a machine is not kept
#            between sessions.
#   restore: the other way, into an empty RUNS_DIR.
# Run from the repository root, with the package installed and Debian's
# dataset-fashion-mnist in /usr/share/datasets/fashion-mnist.
set -euo pipefail

RUNS=$(realpath -m "${1:?usage: $0 RUNS_DIR [train|evaluate|report|save|restore]...}")
shift
if [[ $# -eq 0 ]]; then STEPS=(train evaluate report); else STEPS=("$@"); fi
REPO=$(realpath "$(dirname "$0")/../..")
SAVED="$REPO/docs/results_runs"
CFG="$REPO/configs/fmnist_resnet10_results.py"
EXAMPLES=1000          # paper, strong and AutoAttack protocols
CHECKLIST_EXAMPLES=500
mkdir -p "$RUNS"
cd "$RUNS"

log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$RUNS/times.log"; }

# on CORE, NAME, ARGS...: one command of run NAME pinned to CORE, its output
# appended to NAME.log, its start and end in times.log.
on() {
  local core=$1 name=$2
  shift 2
  log "start $name: $*"
  taskset -c "$core" "$@" >>"$RUNS/$name.log" 2>&1
  log "end $name"
}

train() {  # core name config-args...
  local core=$1 name=$2
  shift 2
  on "$core" "$name" python -m cifs_jax.main --workdir="$name" "$@"
}

evaluate() {  # core name report-name evaluate-args...
  local core=$1 name=$2 report=$3
  shift 3
  if [[ -f "$name/$report.json" ]]; then
    log "skip $name/$report.json: written"
    return
  fi
  on "$core" "$name" python -m cifs_jax.evaluate --workdir="$name" "$@"
}

evaluate_run() {  # core name
  local core=$1 name=$2
  evaluate "$core" "$name" eval_paper_last --protocol=paper \
    --attacks=fgsm,pgd20,cw --num_examples=$EXAMPLES
  evaluate "$core" "$name" eval_strong_cascade_last --protocol=strong \
    --attacks=pgd20 --cascade --num_examples=$EXAMPLES
  evaluate "$core" "$name" eval_autoattack_last --protocol=autoattack \
    --num_examples=$EXAMPLES
  local surrogate=()
  [[ $name != fmnist_vanilla ]] && surrogate=(--surrogate=fmnist_vanilla)
  evaluate "$core" "$name" eval_checklist_last --protocol=checklist \
    --num_examples=$CHECKLIST_EXAMPLES "${surrogate[@]}"
}

step_train() {
  (
    train 0 fmnist_vanilla --config="$CFG:vanilla"
    train 0 fmnist_cas --config="$CFG:cas"
  ) &
  (
    train 1 fmnist_cifs_natural --config="$CFG:cifs,natural" \
      --config.train.epochs=5 '--config.train.lr_milestones=()'
    train 1 fmnist_cifs_from_natural --config="$CFG:cifs" \
      --config.train.init_from=fmnist_cifs_natural
    train 1 fmnist_cifs --config="$CFG:cifs"
  ) &
  wait
}

step_evaluate() {
  (
    evaluate_run 0 fmnist_vanilla
    evaluate_run 0 fmnist_cas
  ) &
  (
    evaluate_run 1 fmnist_cifs_from_natural
    evaluate_run 1 fmnist_cifs
  ) &
  wait
}

step_report() {
  python -m cifs_jax.report --runs=fmnist_vanilla,fmnist_cas,fmnist_cifs,fmnist_cifs_from_natural \
    --out="$REPO/docs/results_report.md"
}

RUN_NAMES=(fmnist_vanilla fmnist_cas fmnist_cifs_natural fmnist_cifs_from_natural fmnist_cifs)

step_save() {
  local name latest step
  for name in "${RUN_NAMES[@]}"; do
    [[ -d $name ]] || continue
    rm -rf "${SAVED:?}/$name"
    mkdir -p "$SAVED/$name/checkpoints"
    cp "$name"/config.json "$name"/metrics.jsonl "$SAVED/$name/"
    cp "$name"/eval_* "$SAVED/$name/" 2>/dev/null || true
    # The log without its progress bars.
    tr '\r' '\n' <"$name.log" | grep -av -E '([0-9.]+|\?)(it|s|batch)/(s|it|batch)' \
      >"$SAVED/$name/$name.log" || true
    latest=""
    for step in "$name"/checkpoints/*; do
      step=${step##*/}
      [[ $step =~ ^[0-9]+$ ]] && ((step > ${latest:--1})) && latest=$step
    done
    [[ -n $latest ]] && cp -r "$name/checkpoints/$latest" "$SAVED/$name/checkpoints/"
  done
  cp times.log "$SAVED/"
}

step_restore() {
  local name
  for name in "${RUN_NAMES[@]}"; do
    [[ -d $SAVED/$name ]] || continue
    [[ -e $name ]] && { echo "$RUNS/$name exists: restore into an empty RUNS_DIR" >&2; exit 1; }
    cp -r "$SAVED/$name" "$name"
    [[ -f $name/$name.log ]] && mv "$name/$name.log" "$name.log"
  done
  [[ -f $SAVED/times.log ]] && cp "$SAVED/times.log" .
}

for step in "${STEPS[@]}"; do
  "step_$step"
done
