# shellcheck shell=bash
# Sourced by launch/multi_process_local.sh and launch/multi_process_evaluate.sh:
# starts N processes of a cifs_jax command on this machine, on JAX's
# distributed runtime, and stops all of them as soon as one fails.

# run_processes NUM_PROCESSES LOG_DIR COMMAND...
#
# Starts COMMAND (e.g. python -m cifs_jax.main --config=...) NUM_PROCESSES
# times, each with --distributed=explicit, the coordinator on
# 127.0.0.1:$PORT (default 12355), --num_processes and its own --process_id.
# Process i sees GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES) with
# G=$GPUS_PER_PROCESS (default 1; 0 leaves CUDA_VISIBLE_DEVICES as it is).
# Process 0 prints to the terminal, process i > 0 to LOG_DIR/process<i>.log.
# When a process exits with an error (or is killed), the others get SIGTERM,
# then SIGKILL after $STOP_GRACE_S seconds (default 10), and the function
# returns that process's status after saying which process it was. Ctrl-C
# (SIGINT) or SIGTERM to the launcher stops all of them the same way.
run_processes() {
  local num_processes=$1 log_dir=$2
  shift 2
  local gpus_per_process=${GPUS_PER_PROCESS:-1} port=${PORT:-12355}
  local i first pid status
  local -a env_args
  # Global: the traps below run outside this function.
  process_pids=()
  declare -gA process_index=()
  trap 'stop_processes; exit 130' INT
  trap 'stop_processes; exit 143' TERM
  for ((i = 0; i < num_processes; i++)); do
    env_args=()
    if ((gpus_per_process > 0)); then
      first=$((i * gpus_per_process))
      env_args=("CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + gpus_per_process - 1)))")
    fi
    local -a command=(env "${env_args[@]}" "$@" --distributed=explicit
      --coordinator_address="127.0.0.1:$port"
      --num_processes="$num_processes" --process_id="$i")
    if ((i == 0)); then
      "${command[@]}" &
    else
      "${command[@]}" >"$log_dir/process$i.log" 2>&1 &
    fi
    process_pids+=("$!")
    process_index[$!]=$i
  done
  local -a running
  while ((${#process_pids[@]} > 0)); do
    status=0
    wait -n -p pid "${process_pids[@]}" || status=$?
    if ((status != 0)); then
      local log="the output above"
      if ((process_index[$pid] > 0)); then
        log="$log_dir/process${process_index[$pid]}.log"
      fi
      echo "launch: process ${process_index[$pid]} of $num_processes" \
        "(pid $pid) exited with status $status$(signal_name "$status");" \
        "stopping the others. See $log." >&2
      stop_processes
      return "$status"
    fi
    running=()
    for i in "${process_pids[@]}"; do
      if ((i != pid)); then running+=("$i"); fi
    done
    process_pids=("${running[@]}")
  done
}

# signal_name STATUS: " (SIGKILL)" for a status 128 + 9, else nothing.
signal_name() {
  if (($1 > 128)); then
    echo " (SIG$(kill -l "$(($1 - 128))"))"
  fi
}

# stop_processes: SIGTERM to every process still running, SIGKILL to those
# left after $STOP_GRACE_S seconds; returns when all have exited.
stop_processes() {
  local pid deadline=$((SECONDS + ${STOP_GRACE_S:-10}))
  kill -TERM "${process_pids[@]}" 2>/dev/null || true
  for pid in "${process_pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
