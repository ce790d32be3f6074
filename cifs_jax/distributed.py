"""Starts JAX's distributed runtime when a run spans several processes.

``python -m cifs_jax.main`` and ``python -m cifs_jax.evaluate`` call
``initialize_from_flags()`` before any JAX computation. The flags:

  --distributed=off       one process (the default; nothing else to set)
  --distributed=auto      ``jax.distributed.initialize()`` detects the cluster
                          (TPU VMs and pod slices, SLURM, Open MPI); any of
                          the three flags below overrides what it detects
  --distributed=explicit  --coordinator_address=HOST:PORT
                          --num_processes=N --process_id=I (all three)

Every process of a run gets the same flags but its own ``--process_id``;
process 0 hosts the coordinator at ``--coordinator_address``.
``--heartbeat_timeout_s`` bounds how long the others run on when one process
dies: the runtime then stops them all. See docs/scaling.md and the scripts
in ``launch/``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

from absl import app, flags, logging
import jax

from cifs_jax.validation import check_choice

MODES = ("off", "auto", "explicit")
# jax.distributed.initialize's default (JAX 0.10).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# The variables by which JAX's SlurmCluster detects SLURM (all of them).
SLURM_VARIABLES = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)

_MODE = flags.DEFINE_enum(
  "distributed",
  "off",
  list(MODES),
  "off: one process. auto: JAX detects the cluster (TPU, SLURM, Open MPI). "
  "explicit: --coordinator_address, --num_processes and --process_id.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0's coordinator, the same for every process.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Number of processes of the run."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index, 0 .. num_processes - 1."
)
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  DEFAULT_HEARTBEAT_TIMEOUT_S,
  "Seconds without a heartbeat after which the distributed runtime declares "
  "a process dead and stops the others (with an error).",
)


def initialize_arguments(
  mode: str = "off",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> dict[str, Any] | None:
  """The keyword arguments of ``jax.distributed.initialize`` for ``mode``.

  Args:
    mode: one of ``MODES`` (see the module docstring).
    coordinator_address: "HOST:PORT" of the coordinator (process 0).
    num_processes: processes of the run (>= 1).
    process_id: this process's index in [0, num_processes).
    heartbeat_timeout_s: seconds without a heartbeat after which a process
      counts as dead and the runtime stops the others (>= 1).

  Returns:
    None for "off" (one process); else the arguments, with cluster
    detection turned off for "explicit".

  Raises:
    ValueError: naming the flags that are missing, out of range, or given
      with ``--distributed=off``.
  """
  check_choice("--distributed", mode, MODES)
  given = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  set_flags = [
    f"--{name}" for name, value in given.items() if value is not None
  ]
  if mode == "off":
    if set_flags:
      raise ValueError(
        f"{', '.join(set_flags)} given with --distributed=off; add "
        "--distributed=explicit (or auto) to start a multi-process run."
      )
    return None
  if mode == "explicit":
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if missing:
      raise ValueError(
        f"--distributed=explicit needs {', '.join(missing)} as well."
      )
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and (
    process_id < 0 or process_id >= (num_processes or process_id + 1)
  ):
    raise ValueError(
      f"--process_id={process_id} must be in [0, --num_processes)"
      f" (--num_processes={num_processes})."
    )
  if heartbeat_timeout_s < 1:
    raise ValueError(
      f"--heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1."
    )
  arguments = {
    name: value for name, value in given.items() if value is not None
  }
  arguments["heartbeat_timeout_seconds"] = heartbeat_timeout_s
  if mode == "explicit":
    arguments["cluster_detection_method"] = "deactivate"
  return arguments


def local_device_ids(
  arguments: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[list[int], str] | None:
  """The GPU ordinals ``jax.distributed.initialize(**arguments)`` will make
  this process use, as JAX 0.10 picks them, and where they come from.

  ``JAX_LOCAL_DEVICE_IDS`` wins; otherwise, under SLURM (all of
  ``SLURM_VARIABLES`` set) with cluster detection on, JAX gives each task
  one GPU, ordinal ``SLURM_LOCALID`` among the GPUs it sees. Returns None
  where JAX leaves the choice open (every visible device is used).
  """
  if ids := environ.get("JAX_LOCAL_DEVICE_IDS"):
    return [int(i) for i in ids.split(",")], f"JAX_LOCAL_DEVICE_IDS={ids}"
  detects = arguments.get("cluster_detection_method") != "deactivate"
  if detects and all(name in environ for name in SLURM_VARIABLES):
    local_id = environ["SLURM_LOCALID"]
    return [int(local_id)], (
      f"SLURM_LOCALID={local_id} (under SLURM, JAX gives each task the GPU "
      "of its local rank)"
    )
  return None


def check_local_devices(
  arguments: Mapping[str, Any], environ: Mapping[str, str]
) -> None:
  """Refuses a GPU layout in which this process would ask for a GPU it
  cannot see (CUDA's "invalid device ordinal", later and less clearly).

  Args:
    arguments: as returned by ``initialize_arguments``.
    environ: the process's environment (``CUDA_VISIBLE_DEVICES``, SLURM's
      variables, ``JAX_LOCAL_DEVICE_IDS``).

  Raises:
    ValueError: naming the ordinals, the visible GPUs and the layouts that
      work.
  """
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  chosen = local_device_ids(arguments, environ)
  if not visible or chosen is None:
    return
  ids, source = chosen
  num_visible = len(visible.split(","))
  if max(ids) >= num_visible:
    raise ValueError(
      f"This process would use GPU(s) {ids}, from {source}, but sees "
      f"{num_visible} (CUDA_VISIBLE_DEVICES={visible}). Make all of a "
      "node's GPUs visible to each of its tasks (SLURM: --gpus-per-node=G "
      "with --ntasks-per-node=G, not --gpus-per-task=1), or run one process "
      "per node with JAX_LOCAL_DEVICE_IDS=0,...,G-1 (see launch/slurm.sbatch)."
    )


def initialize(
  mode: str = "off",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> None:
  """Starts the distributed runtime (a no-op for "off"); arguments as in
  ``initialize_arguments``. Call it once, before any JAX computation."""
  arguments = initialize_arguments(
    mode, coordinator_address, num_processes, process_id, heartbeat_timeout_s
  )
  if arguments is None:
    return
  check_local_devices(arguments, os.environ)
  jax.distributed.initialize(**arguments)
  logging.info(
    "Distributed runtime: process %d of %d, %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def initialize_from_flags() -> None:
  """``initialize`` with the values of the flags of this module; a bad
  combination is a usage error naming the flags."""
  try:
    initialize(
      _MODE.value,
      _COORDINATOR_ADDRESS.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      _HEARTBEAT_TIMEOUT_S.value,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
