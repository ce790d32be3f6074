"""Compiles a per-device step over all devices: pmap or jit(shard_map).

The step is written once with collectives over the axis ``BATCH_AXIS``
(DESIGN §7). With "pmap" (the default) replicated arguments carry a leading
device axis; with "shard_map" they are plain global arrays. Either way the
arguments come from ``data.device_put_split``-style replication
(``replicate``) and ``data.shard_batch``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from cifs_jax import data

BATCH_AXIS = data.BATCH_AXIS


def make_mesh(parallel: str) -> Mesh:
  """The 1-D device mesh: this process's devices for pmap, all for
  shard_map."""
  devices = jax.local_devices() if parallel == "pmap" else jax.devices()
  return Mesh(devices, (BATCH_AXIS,))


def replicate(tree: Any, mesh: Mesh, parallel: str) -> Any:
  """Puts one copy of ``tree`` (host or device arrays, or Python scalars) on
  every device of ``mesh``."""
  return data.device_put_split(jax.tree.map(np.asarray, tree), mesh, parallel)


def unreplicate(tree: Any, parallel: str) -> Any:
  """The host view of a replicated pytree (drops pmap's device axis)."""
  if parallel == "pmap":
    return jax.tree.map(lambda x: x[0], tree)
  return tree


def compile_step(step: Callable, parallel: str, mesh: Mesh,
                 sharded_args: Sequence[bool], donate_first: bool = False
                 ) -> Callable:
  """Compiles ``step`` over the mesh.

  Args:
    step: per-device function whose collectives use ``BATCH_AXIS``; its
      outputs must be replicated (averaged or summed over devices).
    parallel: "pmap" or "shard_map".
    mesh: from ``make_mesh``.
    sharded_args: per positional argument, whether it is split over devices
      (a batch) or replicated (state, the whole dataset).
    donate_first: donate the first argument's buffers (the train state).
  """
  donate = (0,) if donate_first else ()
  if parallel == "pmap":
    return jax.pmap(step, axis_name=BATCH_AXIS, donate_argnums=donate)
  in_specs = tuple(PartitionSpec(BATCH_AXIS) if sharded else PartitionSpec()
                   for sharded in sharded_args)
  # check_vma=False gives the step pmap's semantics: gradients with respect
  # to replicated arguments stay per device until the step's own pmean
  # (with it, JAX would already sum them over devices).
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs,
                               out_specs=PartitionSpec(), check_vma=False),
                 donate_argnums=donate)
