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
process 0 hosts the coordinator at ``--coordinator_address``. See
docs/scaling.md and the scripts in ``launch/``.
"""

from __future__ import annotations

from typing import Any

from absl import app, flags, logging
import jax

from cifs_jax.validation import check_choice

MODES = ("off", "auto", "explicit")

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


def initialize_arguments(
  mode: str = "off",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> dict[str, Any] | None:
  """The keyword arguments of ``jax.distributed.initialize`` for ``mode``.

  Args:
    mode: one of ``MODES`` (see the module docstring).
    coordinator_address: "HOST:PORT" of the coordinator (process 0).
    num_processes: processes of the run (>= 1).
    process_id: this process's index in [0, num_processes).

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
  arguments = {
    name: value for name, value in given.items() if value is not None
  }
  if mode == "explicit":
    arguments["cluster_detection_method"] = "deactivate"
  return arguments


def initialize(
  mode: str = "off",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts the distributed runtime (a no-op for "off"); arguments as in
  ``initialize_arguments``. Call it once, before any JAX computation."""
  arguments = initialize_arguments(
    mode, coordinator_address, num_processes, process_id
  )
  if arguments is None:
    return
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
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
