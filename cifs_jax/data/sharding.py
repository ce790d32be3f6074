"""Puts data on the devices of a 1-D mesh with axis ``batch``, for the step
compiled with `jax.pmap` (leading device axis) or with
`jax.jit(jax.shard_map(...))` (arrays sharded along axis 0).

The mesh is ``jax.sharding.Mesh(devices, ("batch",))``: for pmap this
process's devices (``jax.local_devices()``, in pmap's order), for shard_map
all devices of all processes (``jax.devices()``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifs_jax.data.info import Split

BATCH_AXIS = "batch"
PARALLEL = ("pmap", "shard_map")


def _check(mesh: Mesh, parallel: str) -> None:
  if parallel not in PARALLEL:
    raise ValueError(f"parallel={parallel!r} is not supported; choose one of "
                     f"{PARALLEL}.")
  if mesh.axis_names != (BATCH_AXIS,):
    raise ValueError(f"The data mesh must have the single axis "
                     f"({BATCH_AXIS!r},), got {mesh.axis_names}.")
  if parallel == "pmap" and any(d.process_index != jax.process_index()
                                for d in mesh.devices.flat):
    raise ValueError("For pmap the mesh must hold only this process's "
                     "devices (jax.local_devices()).")


def device_put_split(split: Split, mesh: Mesh, parallel: str) -> Split:
  """Copies a host `Split` (uint8 images, int32 labels) to every device once.

  Args:
    split: a `Split` of numpy arrays, e.g. from `load_split` (or any pytree
      of numpy arrays, replicated the same way); on multi-host runs every
      process passes the same values.
    mesh: see the module docstring.
    parallel: "pmap": leaves get a leading device axis, (D, N, ...) with
      D = mesh.size, one full copy per device (pmap them with in_axes 0; the
      step sees (N, ...)). "shard_map": leaves stay (N, ...), replicated on
      every device of the mesh (in_specs ``PartitionSpec()``).

  Returns:
    The same pytree of jax arrays; index a `Split` inside the step with a
    batch of indices from `train_index_batches` (``split.images[indices]``).
  """
  _check(mesh, parallel)
  if parallel == "pmap":
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    # The broadcast is a view: each device gets one copy, the host none.
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (mesh.size, *x.shape)),
                                 sharding), split)
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), split)


def shard_batch(tree: Any, mesh: Mesh, parallel: str) -> Any:
  """Puts this host's rows of a global batch on the devices.

  Args:
    tree: a pytree of host arrays with leading dimension B_host (this host's
      rows, e.g. a `Batch` or indices from `train_index_batches`).
    mesh: see the module docstring.
    parallel: "pmap": every leaf becomes (D, B_host / D, ...), sharded over
      the leading axis. "shard_map": every leaf becomes one global array
      (B_host * process_count, ...) sharded along axis 0 (in_specs
      ``PartitionSpec("batch")``), the step sees B / mesh.size rows per device.

  Returns:
    The same pytree of jax arrays.
  """
  _check(mesh, parallel)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))

  def put(x):
    x = np.asarray(x)
    num_local = len(mesh.local_devices)
    if x.shape[0] % num_local:
      raise ValueError(f"This host's batch of {x.shape[0]} rows does not "
                       f"split over its {num_local} devices.")
    if parallel == "pmap":
      return jax.device_put(
          x.reshape(num_local, x.shape[0] // num_local, *x.shape[1:]),
          sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, tree)
