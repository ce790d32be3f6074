#!/usr/bin/env bash
# The four Fashion-MNIST models of docs/results.md's larger budget
# (configs/fmnist_resnet10_results.py), start to end: five training runs
# (CIFS the authors' way starts from a natural pre-training run), their
# evaluations and the report. Resumable: run it again after an interruption
# and training goes on from its last checkpoint, the evaluations from their
# partial results; finished reports are kept.
#
#   docs/results_runs/run_all.sh RUNS_DIR [train|evaluate|report|save|restore]...
#
# (default: train evaluate report). Two lanes run side by side, each on one
# core of a 2-core CPU (taskset), since two processes on one core each
# train about 15 % faster together than one process on both. A lane stops at
# its first failure, and so does the script.
#   evaluate: the paper protocol of every run, then the strong protocol,
#            AutoAttack (the standard) and the checklist, each taken by the
#            first free lane.
#   report:  writes docs/results_runs/report.md (figures beside it).
#   save:    copies each run's small files (config.json, metrics.jsonl,
#            eval_*, partial results, its log without progress bars) and
#            its latest and best checkpoints into docs/results_runs/<run>/,
#            to commit: a machine is not kept between sessions.
#   restore: the other way, into an empty RUNS_DIR.
# Run from anywhere, with the package installed and Debian's
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
EVALUATED_RUNS=(fmnist_vanilla fmnist_cas fmnist_cifs_from_natural fmnist_cifs)
CLAIMS="$RUNS/.evaluation_claims"
mkdir -p "$RUNS"
cd "$RUNS"

log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$RUNS/times.log"; }

# on CORE, NAME, ARGS...: one command of run NAME pinned to CORE, its output
# appended to NAME.log, its start and end in times.log; returns its status.
on() {
  local core=$1 name=$2 status=0
  shift 2
  log "start $name: $*"
  taskset -c "$core" "$@" >>"$RUNS/$name.log" 2>&1 || status=$?
  log "end $name (exit status $status): $*"
  return "$status"
}

train() {  # core name config-args...
  local core=$1 name=$2
  shift 2
  on "$core" "$name" python -m cifs_jax.main --workdir="$name" "$@"
  # A stop request (Ctrl-C, SIGTERM) also exits with 0: only the final check
  # in metrics.jsonl says the run is trained and checked.
  if ! grep -qs '"final_check/' "$name/metrics.jsonl"; then
    log "$name has no final check: run again to resume it (if it is trained" \
      "and its check was cut short, with --config.eval.rerun_final=True)"
    return 1
  fi
}

evaluate() {  # core name report-name evaluate-args...
  local core=$1 name=$2 report=$3
  shift 3
  if [[ -f $name/$report.json && ! -e $name/$report.partial.json ]]; then
    log "skip $name/$report.json: written"
    return
  fi
  on "$core" "$name" python -m cifs_jax.evaluate --workdir="$name" "$@"
}

# evaluation CORE PROTOCOL NAME: one evaluation of run NAME.
evaluation() {
  local core=$1 protocol=$2 name=$3
  case $protocol in
    paper)
      evaluate "$core" "$name" eval_paper_last --protocol=paper \
        --attacks=fgsm,pgd20,cw --num_examples=$EXAMPLES ;;
    strong)
      evaluate "$core" "$name" eval_strong_cascade_last --protocol=strong \
        --attacks=pgd20 --cascade --num_examples=$EXAMPLES ;;
    checklist)
      local surrogate=()
      if [[ $name != fmnist_vanilla ]]; then
        surrogate=(--surrogate=fmnist_vanilla)
      fi
      evaluate "$core" "$name" eval_checklist_last --protocol=checklist \
        --num_examples=$CHECKLIST_EXAMPLES "${surrogate[@]}" ;;
    autoattack)
      evaluate "$core" "$name" eval_autoattack_last --protocol=autoattack \
        --num_examples=$EXAMPLES ;;
    *)
      log "unknown protocol $protocol"
      return 1 ;;
  esac
}

# evaluate_lane CORE: the evaluations in one order, one protocol at a time
# over all runs (so an interrupted session leaves every run with the
# same evaluations), each taken by whichever lane reaches it first (mkdir
# claims it). A failure stops both lanes before their next evaluation.
evaluate_lane() {
  local core=$1 protocol name
  for protocol in paper strong autoattack checklist; do
    for name in "${EVALUATED_RUNS[@]}"; do
      if [[ -e $CLAIMS/failed ]]; then
        return 1
      fi
      if mkdir "$CLAIMS/$protocol-$name" 2>/dev/null; then
        evaluation "$core" "$protocol" "$name" || {
          touch "$CLAIMS/failed"
          return 1
        }
      fi
    done
  done
}

# lanes FUNCTION0 FUNCTION1: runs the two lanes side by side; fails if
# either fails.
lanes() {
  "$1" &
  local first=$!
  "$2" &
  local second=$!
  local status=0
  wait "$first" || status=1
  wait "$second" || status=1
  return "$status"
}

train_lane0() {
  train 0 fmnist_vanilla --config="$CFG:vanilla"
  train 0 fmnist_cas --config="$CFG:cas"
}

train_lane1() {
  train 1 fmnist_cifs_natural --config="$CFG:cifs,natural" \
    --config.train.epochs=5 '--config.train.lr_milestones=()'
  train 1 fmnist_cifs_from_natural --config="$CFG:cifs" \
    --config.train.init_from=fmnist_cifs_natural
  train 1 fmnist_cifs --config="$CFG:cifs"
}

evaluate_lane0() { evaluate_lane 0; }

evaluate_lane1() { evaluate_lane 1; }

step_train() { lanes train_lane0 train_lane1; }

step_evaluate() {
  rm -rf "$CLAIMS"
  mkdir -p "$CLAIMS"
  lanes evaluate_lane0 evaluate_lane1
}

step_report() {
  python -m cifs_jax.report \
    --runs="$(IFS=,; echo "${EVALUATED_RUNS[*]}")" \
    --out="$SAVED/report.md"
}

RUN_NAMES=(fmnist_vanilla fmnist_cas fmnist_cifs_natural fmnist_cifs_from_natural fmnist_cifs)

# The latest and the best checkpoint steps of run $1 (the best is what
# another run's train.init_from starts from), one per line.
kept_steps() {
  python - "$1" <<'PYTHON'
import sys
from cifs_jax.runs.directory import RunDirectory
run = RunDirectory(sys.argv[1])
with run.checkpointer(run.load_config(), read_only=True) as checkpointer:
  steps = {checkpointer.latest_step(), checkpointer.best_step()} - {None}
print(*sorted(steps), sep="\n")
PYTHON
}

step_save() {
  local name step steps
  for name in "${RUN_NAMES[@]}"; do
    if [[ ! -f $name/config.json ]]; then
      continue  # not started, or stopped before its first step
    fi
    rm -rf "${SAVED:?}/$name"
    mkdir -p "$SAVED/$name/checkpoints"
    cp "$name"/config.json "$SAVED/$name/"
    cp "$name"/metrics.jsonl "$name"/eval_* "$SAVED/$name/" 2>/dev/null || true
    # The log without its progress bars.
    tr '\r' '\n' <"$name.log" | grep -av -E '([0-9.]+|\?)(it|s|batch)/(s|it|batch)' \
      >"$SAVED/$name/$name.log" || true
    steps=$(kept_steps "$name")
    for step in $steps; do
      cp -r "$name/checkpoints/$step" "$SAVED/$name/checkpoints/"
    done
  done
  if [[ -f times.log ]]; then cp times.log "$SAVED/"; fi
}

step_restore() {
  local name
  for name in "${RUN_NAMES[@]}"; do
    if [[ ! -d $SAVED/$name ]]; then continue; fi
    if [[ -e $name ]]; then
      echo "$RUNS/$name exists: restore into an empty RUNS_DIR" >&2
      exit 1
    fi
    cp -r "$SAVED/$name" "$name"
    if [[ -f $name/$name.log ]]; then mv "$name/$name.log" "$name.log"; fi
  done
  if [[ -f $SAVED/times.log ]]; then cp "$SAVED/times.log" .; fi
}

for step in "${STEPS[@]}"; do
  "step_$step"
done
