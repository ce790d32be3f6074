"""Multi-process runs on JAX's distributed runtime (issues 13, 20).

The fast tests check the flags of ``cifs_jax.distributed``, the GPU layout
a SLURM job gets from ``launch/slurm.sbatch`` (in a fake SLURM environment:
a stub ``srun`` records the command, JAX's own SLURM detection resolves each
task's arguments), that the local launchers stop every process when one dies
(stub processes), and the device line of a report. The slow tests start real
processes on this machine (CPU, loopback, gloo collectives). The first
starts real processes on this machine (CPU, loopback, gloo collectives):

1. a single-process reference with 4 CPU devices trains the Fashion-MNIST
   smoke config (128 examples: 4 steps of 32 per epoch) for 2 epochs;
2. the same run on 2 processes of 2 CPU devices each (``parallel=pmap``),
   killed (SIGKILL of both process groups) after 6 steps, mid-epoch 2, when
   the epoch-1 checkpoint is on disk;
3. both processes restarted (``parallel=shard_map``, so both modes run
   across processes): they resume from epoch 1 and finish, with the final
   evaluation (PGD-20 on 24 test examples: 2 batches of 16, the second half
   padding, all of it on process 1) on the 2 processes;
4. ``python -m cifs_jax.evaluate`` of the final checkpoint on one process.

Checks: both processes hold bit-identical parameters; the checkpoints (after
epoch 1 on 2 processes, after the resumed epoch 2) match the reference's to
float tolerance (``MAX_RELATIVE_DISTANCE``) and the per-epoch evaluations
equal its; the distributed final evaluation equals the single-process
evaluation of the same checkpoint. The second kills one of two processes
and checks that the other stops within ``--heartbeat_timeout_s``.

  python -m pytest -q tests/test_distributed.py -m "slow or long"
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
from jax._src import clusters
import numpy as np
import pytest

from cifs_jax import data, distributed, experiment_config, models
from cifs_jax.evaluation import evaluator, protocols
from cifs_jax.runs import checkpoints
from cifs_jax.runs import evaluation as runner
from cifs_jax.runs.directory import RunDirectory
from cifs_jax.training.train_state import create_train_state
from tests.distributed_worker import flat_params
from tests.idx_files import needs_fashion_mnist

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # max_examples / batch_size below.
HANG_AFTER_STEPS = 6  # mid-epoch 2
PHASE_TIMEOUT_S = 600
NUM_EVAL_EXAMPLES = 24
# 2 processes x 2 devices sum gradients in another order than 1 x 4; the
# sign steps of PGD amplify such float differences over training, so the
# bound grows with the step (relative L2 distance of all parameters; measured
# on a 2-core x86_64: 5e-8 to 2.4e-7 after epoch 1, 4e-5 to 1.5e-4 after
# epoch 2, and 1.7e-3 after 16 steps in another run). One training step
# moves the parameters by about 2 % (8 % in 4 steps): a missed, repeated or
# reordered step would be far above these bounds.
MAX_RELATIVE_DISTANCE = {STEPS_PER_EPOCH: 1e-5, 2 * STEPS_PER_EPOCH: 1e-3}
EVAL_BATCH_SIZE = 16
CONFIG_FLAGS = (
  "--config=configs/fmnist_resnet10.py:smoke",
  "--config.train.max_examples=128",
  "--config.train.epochs=2",
  f"--config.eval.num_examples={NUM_EVAL_EXAMPLES}",
  f"--config.eval.batch_size={EVAL_BATCH_SIZE}",
  f"--config.eval.final_num_examples={NUM_EVAL_EXAMPLES}",
)


# ------------------------------------------------------------ fast: flags


def test_off_is_one_process_with_nothing_to_set():
  assert distributed.initialize_arguments() is None


def test_explicit_passes_the_three_values_without_cluster_detection():
  assert distributed.initialize_arguments(
    "explicit", "10.0.0.1:1234", 4, 3, heartbeat_timeout_s=20
  ) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 3,
    "heartbeat_timeout_seconds": 20,
    "cluster_detection_method": "deactivate",
  }


def test_auto_detects_and_passes_only_the_given_overrides():
  default = {"heartbeat_timeout_seconds": 100}
  assert distributed.initialize_arguments("auto") == default
  assert distributed.initialize_arguments("auto", num_processes=8) == {
    "num_processes": 8,
    **default,
  }


def test_the_heartbeat_timeout_is_an_argument_of_jax_initialize():
  """The default is JAX's own, and the name is one it takes."""
  parameter = inspect.signature(jax.distributed.initialize).parameters[
    "heartbeat_timeout_seconds"
  ]
  assert parameter.default == distributed.DEFAULT_HEARTBEAT_TIMEOUT_S


@pytest.mark.parametrize(
  "arguments, message",
  [
    (("off", "h:1"), "--coordinator_address given with --distributed=off"),
    (("off", None, 2, 0), "--num_processes, --process_id given with"),
    (("explicit", "h:1"), "needs --num_processes, --process_id"),
    (("explicit", "h:1", 2, 2), r"--process_id=2 must be in \[0, "),
    (("auto", None, None, -1), r"--process_id=-1 must be in \[0, "),
    (("explicit", "h:1", 0, 0), "--num_processes=0 must be >= 1"),
    (("cluster",), "--distributed='cluster' is not supported"),
    (("auto", None, None, None, 0), "--heartbeat_timeout_s=0 must be >= 1"),
  ],
)
def test_bad_combinations_name_the_flags(arguments, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_arguments(*arguments)


# ---------------------------------------------- fast: the SLURM GPU layout

SLURM_JOB_ID = "4242"
NODE_LIST = "gpu[001-002]"


def sbatch_directives(script: pathlib.Path) -> dict[str, int]:
  """The numeric ``#SBATCH --name=value`` lines of a batch script."""
  found = re.findall(r"^#SBATCH --([\w-]+)=(\d+)$", script.read_text(), re.M)
  return {name: int(value) for name, value in found}


def run_sbatch_body(script: pathlib.Path, tmp_path, *arguments: str):
  """Runs a batch script as sbatch would on the first node, with a stub
  ``srun`` that records its command; returns (command, JAX_LOCAL_DEVICE_IDS
  as the script leaves it) of the srun call."""
  stub_dir = tmp_path / "bin"
  stub_dir.mkdir()
  record = tmp_path / "srun_call"
  srun = stub_dir / "srun"
  srun.write_text(
    textwrap.dedent(f"""\
      #!/usr/bin/env bash
      {{ echo "${{JAX_LOCAL_DEVICE_IDS:-}}"; printf '%s\\n' "$@"; }} \\
        >{shlex.quote(str(record))}
      """)
  )
  srun.chmod(0o755)
  env = {
    "PATH": f"{stub_dir}:{os.environ['PATH']}",
    "SLURM_JOB_ID": SLURM_JOB_ID,
    "SLURM_JOB_NODELIST": NODE_LIST,
    "SLURM_SUBMIT_DIR": str(REPO),
  }
  subprocess.run(
    ["bash", str(script), *arguments], cwd=REPO, env=env, check=True
  )
  local_ids, *command = record.read_text().splitlines()
  return command, local_ids


def slurm_task_environments(directives: dict[str, int], local_ids: str):
  """The environment of every task of the job step, as SLURM sets it:
  with --gpus-per-node each task sees all of its node's GPUs, with
  --gpus-per-task only its own (renumbered from 0, as under the usual
  cgroup device constraint)."""
  nodes, tasks_per_node = directives["nodes"], directives["ntasks-per-node"]
  if "gpus-per-node" in directives:
    visible = directives["gpus-per-node"]
  else:
    visible = directives["gpus-per-task"]
  for node in range(nodes):
    for local_id in range(tasks_per_node):
      env = {
        "SLURM_JOB_ID": SLURM_JOB_ID,
        "SLURM_STEP_NODELIST": NODE_LIST,
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_PROCID": str(node * tasks_per_node + local_id),
        "SLURM_LOCALID": str(local_id),
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(visible))),
      }
      if local_ids:
        env["JAX_LOCAL_DEVICE_IDS"] = local_ids
      yield node, env


def distributed_flags(command: list[str]) -> dict[str, str]:
  """{"distributed": "auto", ...}: the flags of cifs_jax.distributed in an
  argument list (absl's --name=value form)."""
  names = (
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "heartbeat_timeout_s",
  )
  pairs = (a[2:].split("=", 1) for a in command if a.startswith("--"))
  return {name: value for name, value in pairs if name in names}


def jax_resolved_arguments(monkeypatch, env, arguments):
  """(coordinator, num_processes, process_id, local_device_ids) as
  ``jax.distributed.initialize(**arguments)`` resolves them in ``env``."""
  for name in (*distributed.SLURM_VARIABLES, "JAX_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  local_ids = env.get("JAX_LOCAL_DEVICE_IDS")
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
    arguments.get("coordinator_address"),
    arguments.get("num_processes"),
    arguments.get("process_id"),
    [int(i) for i in local_ids.split(",")] if local_ids else None,
    arguments.get("cluster_detection_method"),
    300,
  )


@pytest.mark.parametrize(
  "script, arguments, entry",
  [
    ("slurm.sbatch", ("configs/cifar_resnet18.py",), "main"),
    ("slurm_evaluate.sbatch", (), "evaluate"),
  ],
)
def test_slurm_tasks_use_every_gpu_of_their_node_once(
  monkeypatch, tmp_path, script, arguments, entry
):
  """Every task of the job's step gets a GPU it can see (JAX's own SLURM
  detection, run on each task's environment), the GPUs of a node are shared
  out one per task, and all tasks find the same coordinator."""
  script = REPO / "launch" / script
  directives = sbatch_directives(script)
  command, local_ids = run_sbatch_body(
    script, tmp_path, *arguments, "/shared/run", "--x=1"
  )
  assert command[:3] == ["python", "-m", f"cifs_jax.{entry}"]
  assert {"--workdir=/shared/run", "--x=1"} <= set(command)
  flags = distributed_flags(command)
  assert flags == {"distributed": "auto"}
  arguments = distributed.initialize_arguments(flags["distributed"])
  gpus_by_node, resolved = {}, []
  for node, env in slurm_task_environments(directives, local_ids):
    distributed.check_local_devices(arguments, env)
    coordinator, count, process_id, ids = jax_resolved_arguments(
      monkeypatch, env, arguments
    )
    assert ids == distributed.local_device_ids(arguments, env)[0]
    assert max(ids) < len(env["CUDA_VISIBLE_DEVICES"].split(","))
    gpus_by_node.setdefault(node, []).extend(ids)
    resolved.append((coordinator, count, process_id))
  num_tasks = directives["nodes"] * directives["ntasks-per-node"]
  port = int(SLURM_JOB_ID) % 2**12 + 65535 - 2**12 + 1  # JAX's rule
  assert resolved == [
    (f"gpu001:{port}", num_tasks, i) for i in range(num_tasks)
  ]
  for gpus in gpus_by_node.values():
    assert sorted(gpus) == list(range(directives["gpus-per-node"]))


@pytest.mark.parametrize(
  "env, message",
  [
    (
      {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "0"},
      r"GPU\(s\) \[1\], from SLURM_LOCALID=1 .* sees 1 "
      r"\(CUDA_VISIBLE_DEVICES=0\).*--gpus-per-node",
    ),
    (
      {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "5,6"},
      r"GPU\(s\) \[0, 1, 2, 3\], from JAX_LOCAL_DEVICE_IDS=0,1,2,3",
    ),
  ],
)
def test_a_gpu_the_process_cannot_see_is_refused(env, message):
  """The layout of ``--gpus-per-task=1`` (one visible GPU per task, JAX
  asking for GPU SLURM_LOCALID), and local ids beyond the visible GPUs."""
  slurm = {name: "1" for name in distributed.SLURM_VARIABLES}
  arguments = distributed.initialize_arguments("auto")
  with pytest.raises(ValueError, match=message):
    distributed.check_local_devices(arguments, {**slurm, **env})


def test_visible_gpus_and_explicit_runs_are_left_to_jax():
  slurm = {name: "3" for name in distributed.SLURM_VARIABLES}
  auto = distributed.initialize_arguments("auto")
  explicit = distributed.initialize_arguments("explicit", "h:1", 4, 3)
  visible = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  distributed.check_local_devices(auto, {**slurm, **visible})
  # Cluster detection is off: JAX does not pick GPU SLURM_LOCALID.
  assert distributed.local_device_ids(explicit, slurm) is None
  distributed.check_local_devices(
    explicit, {**slurm, "CUDA_VISIBLE_DEVICES": "0"}
  )


# ------------------------------------ fast: the local launchers stop together

STUB_PYTHON = """\
#!/usr/bin/env bash
# Stands in for python: records its arguments; --process_id=1 dies of a
# SIGKILL after a moment, the others wait to be stopped.
for argument; do
  case $argument in --process_id=*) id=${argument#--process_id=} ;; esac
done
printf '%s\\n' "$@" >"$STUB_OUT/arguments$id"
echo $$ >"$STUB_OUT/pid$id"
if [[ $id == 1 ]]; then
  sleep 1
  kill -KILL $$
fi
exec sleep 300
"""


@pytest.mark.parametrize(
  "script, arguments, entry",
  [
    ("multi_process_local.sh", ("configs/x.py",), "cifs_jax.main"),
    ("multi_process_evaluate.sh", (), "cifs_jax.evaluate"),
  ],
)
def test_local_launcher_stops_every_process_when_one_dies(
  tmp_path, script, arguments, entry
):
  stub_dir, out, workdir = (tmp_path / d for d in ("bin", "out", "run"))
  for directory in (stub_dir, out, workdir):
    directory.mkdir()
  (stub_dir / "python").write_text(STUB_PYTHON)
  (stub_dir / "python").chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{stub_dir}:{os.environ['PATH']}",
    STUB_OUT=str(out),
    GPUS_PER_PROCESS="0",
    STOP_GRACE_S="5",
  )
  start = time.monotonic()
  result = subprocess.run(
    ["bash", f"launch/{script}", "3", *arguments, str(workdir), "--x=1"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert time.monotonic() - start < 30
  assert result.returncode == 128 + signal.SIGKILL, result.stderr
  assert "process 1 of 3" in result.stderr
  assert "(SIGKILL)" in result.stderr
  assert f"{workdir}/process1.log" in result.stderr
  for i in range(3):
    pid = int((out / f"pid{i}").read_text())
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
    command = (out / f"arguments{i}").read_text().splitlines()
    assert command[:2] == ["-m", entry]
    assert f"--workdir={workdir}" in command
    assert distributed_flags(command) == {
      "distributed": "explicit",
      "coordinator_address": "127.0.0.1:12355",
      "num_processes": "3",
      "process_id": str(i),
    }


# -------------------------------------------- fast: a report's device line


def test_the_device_line_counts_the_devices_of_every_process(monkeypatch):
  """Process 0 of 2 holds one of the two CPU devices (conftest): the
  report's device line counts both and says over how many processes."""
  config, protocol = experiment_config.base_config(), protocols.paper_protocol()
  assert runner.run_label(config, protocol, None, 8)["device"] == (
    "2 x cpu (cpu)"
  )
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_devices", lambda: jax.devices()[:1])
  monkeypatch.setattr(jax, "local_device_count", lambda: 1)
  assert runner.run_label(config, protocol, None, 8)["device"] == (
    "2 x cpu (cpu) over 2 processes"
  )


# ------------------------------------- fast: evaluation ids across processes


@pytest.mark.parametrize("num_examples", [24, 13, 32])
def test_example_ids_are_split_indices_on_every_process(
  monkeypatch, num_examples
):
  """Each process's valid rows get their index in the split (the stream of
  valid examples), which fixes their random starts, as on one process. The
  processes are simulated: the all-gather of the valid counts returns both
  processes' counts."""
  batch_size, count = 16, 2
  per_process = [
    list(
      data.eval_index_batches(
        num_examples, batch_size, process_index=p, process_count=count
      )
    )
    for p in range(count)
  ]
  for p in range(count):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    num_seen = 0
    for b, (indices, mask) in enumerate(per_process[p]):
      counts = np.array([per_process[q][b][1].sum() for q in range(count)])
      monkeypatch.setattr(
        evaluator.multihost_utils, "process_allgather", lambda _: counts
      )
      ids, num_seen = evaluator._example_ids(mask, num_seen)
      np.testing.assert_array_equal(ids[mask], indices[mask])
    assert num_seen == num_examples


# ----------------------------------------------------- slow: real processes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    JAX_NUM_CPU_DEVICES=str(num_devices),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    PYTHONUNBUFFERED="1",
  )
  env.pop("XLA_FLAGS", None)  # the commands compile as users' do
  return env


class Processes:
  """Subprocesses, each in its own process group and with its own log file
  in ``log_dir``; ``close`` kills every group still running."""

  def __init__(self, log_dir: pathlib.Path):
    self.log_dir = log_dir
    self.names: dict[subprocess.Popen, str] = {}

  def start(self, name: str, command: list[str], env) -> subprocess.Popen:
    with open(self.log_dir / f"{name}.log", "w") as log:
      process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    self.names[process] = name
    return process

  def log(self, process) -> str:
    return (self.log_dir / f"{self.names[process]}.log").read_text()

  def wait(self, processes, deadline: float) -> None:
    """Waits for ``processes`` to exit 0 before ``deadline``."""
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
      assert process.returncode == 0, (
        f"{self.names[process]}: exit code {process.returncode}\n"
        f"{self.log(process)[-5000:]}"
      )

  def kill(self, processes) -> None:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
      process.wait()

  def close(self) -> None:
    self.kill(self.names)


def worker_command(out_dir, hang_after_steps: int, *flags: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "tests.distributed_worker",
    str(out_dir),
    str(hang_after_steps),
    *CONFIG_FLAGS,
    *flags,
  ]


def start_two_processes(
  processes: Processes, name: str, out_dir, hang_after_steps: int, *flags
):
  port = free_port()
  return [
    processes.start(
      f"{name}_process{i}",
      worker_command(
        out_dir,
        hang_after_steps,
        *flags,
        "--distributed=explicit",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cpu_env(2),
    )
    for i in range(2)
  ]


def wait_for_files(paths, processes: Processes, running, deadline) -> None:
  while not all(p.exists() for p in paths):
    for process in running:
      assert process.poll() is None, processes.log(process)[-5000:]
    assert time.monotonic() < deadline, f"timed out waiting for {paths}"
    time.sleep(1)


def read_params(path) -> dict[str, np.ndarray]:
  with np.load(path) as npz:
    return dict(npz)


def checkpoint_params(workdir, step: int) -> dict[str, np.ndarray]:
  """The parameters of a run's checkpoint, restored on this process's
  devices (the checkpoint was written on 4)."""
  run = RunDirectory(workdir)
  config = run.load_config()
  target = create_train_state(
    models.build_model(config.model),
    data.get_info(config.data.name).image_shape,
    config,
    steps_per_epoch=1,
  )
  with run.checkpointer(config) as ckpt:
    state, _ = ckpt.restore(step, target)
  return flat_params(state.params)


def assert_params_close(actual, expected, step: int):
  """Same leaves, at a relative L2 distance below the bound for ``step``
  (``MAX_RELATIVE_DISTANCE``)."""
  assert sorted(actual) == sorted(expected)
  distance = np.sqrt(
    sum(np.sum((actual[k] - expected[k]) ** 2) for k in actual)
  )
  norm = np.sqrt(sum(np.sum(expected[k] ** 2) for k in expected))
  print(f"relative parameter distance after step {step}: {distance / norm:.2g}")
  assert distance / norm < MAX_RELATIVE_DISTANCE[step], distance / norm


def epoch_evaluations(workdir) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [e for e in map(json.loads, lines) if "epoch" in e]


# ~5 min on a 2-core machine (three training processes at once): in the
# long tier, run before any change to cifs_jax/distributed.py or parallel.py.
@pytest.mark.long
@needs_fashion_mnist
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path):
  start = time.monotonic()
  reference, distributed_run = tmp_path / "reference", tmp_path / "two"
  out = {name: tmp_path / f"{name}_out" for name in ("reference", "two")}
  for directory in out.values():
    directory.mkdir()
  processes = Processes(tmp_path)
  try:
    # 1. The reference, on one process with 4 devices; while it runs, the
    # two processes (2 devices each) train until they are killed.
    reference_process = processes.start(
      "reference",
      worker_command(
        out["reference"],
        0,
        f"--workdir={reference}",
        "--config.eval.final=False",
      ),
      cpu_env(4),
    )
    two = start_two_processes(
      processes,
      "interrupted",
      out["two"],
      HANG_AFTER_STEPS,
      f"--workdir={distributed_run}",
      "--config.parallel=pmap",
    )
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    wait_for_files(
      [out["two"] / f"hung_process{i}" for i in range(2)],
      processes,
      two,
      deadline,
    )
    processes.kill(two)
    with checkpoints.Checkpointer(distributed_run / "checkpoints") as ckpt:
      assert ckpt.all_steps() == [STEPS_PER_EPOCH]
    processes.wait([reference_process], deadline)
    assert_params_close(
      checkpoint_params(distributed_run, STEPS_PER_EPOCH),
      checkpoint_params(reference, STEPS_PER_EPOCH),
      STEPS_PER_EPOCH,
    )

    # 2. Both processes restart, resume from epoch 1 and finish, then run
    # the final evaluation on the two processes.
    two = start_two_processes(
      processes,
      "resumed",
      out["two"],
      0,
      f"--workdir={distributed_run}",
      "--config.parallel=shard_map",
    )
    processes.wait(two, time.monotonic() + PHASE_TIMEOUT_S)
    assert "(epoch 2, step 0 of " in processes.log(two[0])  # "Resuming ..."
    params = [
      read_params(out["two"] / f"params_process{i}.npz") for i in (0, 1)
    ]
    for key in params[0]:
      np.testing.assert_array_equal(params[0][key], params[1][key], key)
    final_step = 2 * STEPS_PER_EPOCH
    reference_params = read_params(out["reference"] / "params_process0.npz")
    assert_params_close(params[0], reference_params, final_step)
    assert_params_close(
      checkpoint_params(distributed_run, final_step),
      checkpoint_params(reference, final_step),
      final_step,
    )
    evaluations = epoch_evaluations(distributed_run)
    reference_evaluations = epoch_evaluations(reference)
    assert len(evaluations) == len(reference_evaluations) == 2
    for actual, expected in zip(evaluations, reference_evaluations):
      assert actual == pytest.approx(expected, abs=1e-6), (actual, expected)

    # 3. The same checkpoint evaluated on one process gives the same numbers.
    single = processes.start(
      "evaluate",
      [
        sys.executable,
        "-m",
        "cifs_jax.evaluate",
        f"--workdir={distributed_run}",
        "--checkpoint=last",
        "--attacks=fgsm",  # the smoke config's final attacks
        f"--num_examples={NUM_EVAL_EXAMPLES}",
        f"--batch_size={EVAL_BATCH_SIZE}",
      ],
      cpu_env(4),
    )
    processes.wait([single], time.monotonic() + PHASE_TIMEOUT_S)
    two_process_report = json.loads(
      (distributed_run / "eval_paper.json").read_text()
    )
    one_process_report = json.loads(
      (distributed_run / "eval_paper_last.json").read_text()
    )
    assert two_process_report["num_examples"] == NUM_EVAL_EXAMPLES
    # The numbers agree; the labels differ in what they describe (date,
    # devices, "final state" vs the checkpoint "last" of the same step).
    labels = (two_process_report.pop("run"), one_process_report.pop("run"))
    assert labels[0]["checkpoint"]["step"] == labels[1]["checkpoint"]["step"]
    assert labels[0]["device"] == "4 x cpu (cpu) over 2 processes"
    assert labels[1]["device"] == "4 x cpu (cpu)"
    assert two_process_report == one_process_report
  finally:
    processes.close()
    print(f"two-process test: {time.monotonic() - start:.0f} s wall")


HEARTBEAT_TIMEOUT_S = 5
# Starting a process (importing JAX, connecting) on a busy 2-core machine.
START_S = 60


@pytest.mark.slow
def test_a_dead_process_stops_the_others_within_the_heartbeat_timeout(
  tmp_path,
):
  """Process 1 of 2 is killed; process 0, idle (as a process waiting in a
  collective would be), exits with an error after about
  ``--heartbeat_timeout_s`` rather than JAX's default 100 s."""
  port = free_port()
  program = textwrap.dedent(f"""\
    import pathlib, sys, time
    from cifs_jax import distributed
    distributed.initialize(
      "explicit", "127.0.0.1:{port}", 2, int(sys.argv[1]),
      heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S},
    )
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(300)
    """)
  processes = Processes(tmp_path)
  try:
    started = [tmp_path / f"started{i}" for i in range(2)]
    running = [
      processes.start(
        f"idle{i}",
        [sys.executable, "-c", program, str(i), str(started[i])],
        cpu_env(1),
      )
      for i in range(2)
    ]
    wait_for_files(started, processes, running, time.monotonic() + START_S)
    processes.kill(running[1:])
    killed = time.monotonic()
    running[0].wait(timeout=HEARTBEAT_TIMEOUT_S + START_S)
    stopped_after = time.monotonic() - killed
    print(f"process 0 stopped {stopped_after:.0f} s after process 1's kill")
    assert running[0].returncode != 0
    assert stopped_after < 100 - START_S
  finally:
    processes.close()
