"""Device placement: where arrays live and how a per-device step is compiled.

A step is written once, per device, with collectives over the axis
``BATCH_AXIS`` (``lax.pmean`` of gradients, metrics and batch-norm
statistics), and compiled with ``jax.pmap`` ("pmap", the default) or with
``jax.jit(jax.shard_map(...))`` over a 1-D mesh ("shard_map"); see
docs/design.md §7. ``Parallel`` is the one object that knows the mode
and the mesh; training, evaluation and the attacks all place data through it::

  parallel = Parallel.create("pmap")
  state = parallel.replicate(state)                 # one copy per device
  step = parallel.compile(step_fn, sharded_args=(False, True))
  state, metrics = step(state, parallel.shard(batch))
  host_state = parallel.unreplicate(state)

The mesh is ``Mesh(devices, ("batch",))``: for pmap this process's devices
(``jax.local_devices()``, in pmap's order), for shard_map all devices of all
processes (``jax.devices()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifs_jax.validation import check_choice

BATCH_AXIS = "batch"
MODES = ("pmap", "shard_map")


def is_chief() -> bool:
  """Whether this process writes the files every process computes (reports,
  metrics, config, checksums) and draws progress bars: process 0. The one
  place this rule lives."""
  return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Parallel:
  """A compilation mode and the 1-D device mesh it runs on.

  Attributes:
    mode: "pmap" (replicated arrays carry a leading device axis) or
      "shard_map" (global arrays, replicated or sharded along axis 0).
    mesh: the devices, with the single axis ``BATCH_AXIS``.
  """

  mode: str
  mesh: Mesh

  def __post_init__(self):
    check_choice("parallel", self.mode, MODES)
    if self.mesh.axis_names != (BATCH_AXIS,):
      raise ValueError(
        f"The device mesh must have the single axis "
        f"({BATCH_AXIS!r},), got {self.mesh.axis_names}."
      )
    if self.mode == "pmap" and any(
      d.process_index != jax.process_index() for d in self.mesh.devices.flat
    ):
      raise ValueError(
        "For pmap the mesh must hold only this process's "
        "devices (jax.local_devices())."
      )

  @classmethod
  def create(
    cls, mode: str, devices: Sequence[jax.Device] | None = None
  ) -> Parallel:
    """``mode`` over ``devices`` (default: see the module docstring)."""
    check_choice("parallel", mode, MODES)
    if devices is None:
      devices = jax.local_devices() if mode == "pmap" else jax.devices()
    return cls(mode, Mesh(np.asarray(devices), (BATCH_AXIS,)))

  @property
  def num_devices(self) -> int:
    """Devices of the mesh, over all processes."""
    return self.mesh.size

  @property
  def num_local_devices(self) -> int:
    """Devices of the mesh attached to this process."""
    return len(self.mesh.local_devices)

  def replicate(self, tree: Any) -> Any:
    """One copy of ``tree`` (host or device arrays, Python scalars) on every
    device; on several processes every process passes the same values.

    "pmap": leaves get a leading device axis, (D, ...) (pmap them with
    in_axes 0; the step sees (...)). "shard_map": leaves keep their shape,
    replicated on every device (in_specs ``PartitionSpec()``).
    """
    tree = jax.tree.map(np.asarray, tree)
    if self.mode == "pmap":
      sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
      # The broadcast is a view: each device gets one copy, the host none.
      return jax.tree.map(
        lambda x: jax.device_put(
          np.broadcast_to(x, (self.num_devices, *x.shape)), sharding
        ),
        tree,
      )
    sharding = NamedSharding(self.mesh, PartitionSpec())
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), tree
    )

  def unreplicate(self, tree: Any) -> Any:
    """The single-copy view of a replicated pytree (drops pmap's axis).

    On several processes every leaf is a global array, fully replicated over
    all processes' devices, which Orbax can save (pmap's ``x[0]`` alone is
    local to each process); every process must hold the same values.
    """
    if self.mode == "shard_map":
      return tree
    if jax.process_count() == 1:
      return jax.tree.map(lambda x: x[0], tree)
    everywhere = NamedSharding(
      Mesh(np.asarray(jax.devices()), (BATCH_AXIS,)), PartitionSpec()
    )
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
        everywhere, np.asarray(x[0])
      ),
      tree,
    )

  def shard(self, tree: Any) -> Any:
    """Puts this process's rows of a global batch on its devices.

    Args:
      tree: a pytree of host arrays with leading dimension B_host (this
        process's rows, e.g. a ``data.Batch`` or example indices).

    Returns:
      "pmap": every leaf as (D, B_host / D, ...), sharded over the leading
      axis. "shard_map": every leaf as one global array (B_host *
      process_count, ...) sharded along axis 0 (in_specs
      ``PartitionSpec(BATCH_AXIS)``): each device sees B / D rows.
    """
    sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
    num_local = self.num_local_devices

    def put(x):
      x = np.asarray(x)
      if x.shape[0] % num_local:
        raise ValueError(
          f"This process's batch of {x.shape[0]} rows does "
          f"not split over its {num_local} devices."
        )
      if self.mode == "pmap":
        return jax.device_put(
          x.reshape(num_local, x.shape[0] // num_local, *x.shape[1:]), sharding
        )
      return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, tree)

  def compile(
    self,
    step: Callable,
    sharded_args: Sequence[bool],
    donate_first: bool = False,
  ) -> Callable:
    """Compiles a per-device ``step`` over the mesh.

    Args:
      step: per-device function whose collectives use ``BATCH_AXIS``; its
        outputs must be replicated (averaged or summed over devices).
      sharded_args: per positional argument, whether it is split over
        devices (a batch, from ``shard``) or replicated (from ``replicate``).
      donate_first: donate the first argument's buffers (the train state).
    """
    donate = (0,) if donate_first else ()
    if self.mode == "pmap":
      return jax.pmap(step, axis_name=BATCH_AXIS, donate_argnums=donate)
    in_specs = tuple(
      PartitionSpec(BATCH_AXIS) if sharded else PartitionSpec()
      for sharded in sharded_args
    )
    # check_vma=False gives the step pmap's semantics: gradients with respect
    # to replicated arguments stay per device until the step's own pmean
    # (with it, JAX would already sum them over devices).
    return jax.jit(
      jax.shard_map(
        step,
        mesh=self.mesh,
        in_specs=in_specs,
        out_specs=PartitionSpec(),
        check_vma=False,
      ),
      donate_argnums=donate,
    )
