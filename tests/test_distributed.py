"""Multi-process runs on JAX's distributed runtime (issue 13).

The fast tests check the flags of ``cifs_jax.distributed``. The slow test
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
evaluation of the same checkpoint.

  python -m pytest -q tests/test_distributed.py -m slow
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cifs_jax import data, distributed, models
from cifs_jax.evaluation import evaluator
from cifs_jax.runs.directory import RunDirectory
from cifs_jax.runs import checkpoints
from cifs_jax.training.train_state import create_train_state
from tests.distributed_worker import flat_params

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
STEPS_PER_EPOCH = 4  # max_examples / batch_size below.
HANG_AFTER_STEPS = 6  # mid-epoch 2
PHASE_TIMEOUT_S = 600
NUM_EVAL_EXAMPLES = 24
# 2 processes x 2 devices sum gradients in another order than 1 x 4; the
# sign steps of PGD amplify such float differences (measured: 5e-8 after
# epoch 1, 4e-5 after epoch 2, 2-core x86_64), while one training step moves
# the parameters by about 2 % (8 % in 4 steps): a missed, repeated or
# reordered step would be far above this bound.
MAX_RELATIVE_DISTANCE = 1e-3
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
    "explicit", "10.0.0.1:1234", 4, 3
  ) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 3,
    "cluster_detection_method": "deactivate",
  }


def test_auto_detects_and_passes_only_the_given_overrides():
  assert distributed.initialize_arguments("auto") == {}
  assert distributed.initialize_arguments("auto", num_processes=8) == {
    "num_processes": 8
  }


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
  ],
)
def test_bad_combinations_name_the_flags(arguments, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_arguments(*arguments)


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
  env.pop("XLA_FLAGS", None)
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


def assert_params_close(actual, expected):
  """Same leaves, at a relative L2 distance below ``MAX_RELATIVE_DISTANCE``."""
  assert sorted(actual) == sorted(expected)
  distance = np.sqrt(
    sum(np.sum((actual[k] - expected[k]) ** 2) for k in actual)
  )
  norm = np.sqrt(sum(np.sum(expected[k] ** 2) for k in expected))
  assert distance / norm < MAX_RELATIVE_DISTANCE, distance / norm


def epoch_evaluations(workdir) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [e for e in map(json.loads, lines) if "epoch" in e]


@pytest.mark.slow
@pytest.mark.skipif(
  not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
  reason="needs Debian's dataset-fashion-mnist",
)
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
    assert "at epoch 1, step 0." in processes.log(two[0])  # "Resuming ..."
    params = [
      read_params(out["two"] / f"params_process{i}.npz") for i in (0, 1)
    ]
    for key in params[0]:
      np.testing.assert_array_equal(params[0][key], params[1][key], key)
    final_step = 2 * STEPS_PER_EPOCH
    reference_params = read_params(out["reference"] / "params_process0.npz")
    assert_params_close(params[0], reference_params)
    assert_params_close(
      checkpoint_params(distributed_run, final_step),
      checkpoint_params(reference, final_step),
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
        "--attacks=pgd20",
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
    assert two_process_report == one_process_report
  finally:
    processes.close()
    print(f"two-process test: {time.monotonic() - start:.0f} s wall")
