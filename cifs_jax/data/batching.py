"""Which examples form each batch: seeded epochs for training, padded
in-order batches for evaluation, and this host's slice of every global batch.

Everything here is host-side numpy on indices. Every host computes the same
global batch (from the same key) and keeps rows
``[process_index * B / process_count, (process_index + 1) * B / process_count)``
of it, so the global batches do not depend on the number of hosts or devices.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import jax
import numpy as np

from cifs_jax.data.info import Split


class Batch(NamedTuple):
  """This host's rows of one evaluation batch.

  Attributes:
    images: uint8 (B_host, H, W, C).
    labels: int32 (B_host,).
    mask: bool (B_host,), False on the padding rows that complete the last
      batch; each example of the split is True in exactly one batch.
  """

  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


def _host_rows(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> slice:
  """The rows of a global batch that this host keeps."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % count:
    raise ValueError(
      f"The global batch size {global_batch_size} must be a "
      f"positive multiple of the number of hosts {count}."
    )
  per_host = global_batch_size // count
  return slice(index * per_host, (index + 1) * per_host)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps per epoch; the last partial batch is dropped."""
  return num_examples // global_batch_size


def epoch_permutation(
  key: jax.Array, epoch: int, num_examples: int
) -> np.ndarray:
  """The order of the examples in epoch ``epoch``: int32 (num_examples,).

  A function of (key, epoch) alone, computed on the CPU so that every host
  and backend gets the same order; resuming needs nothing else. (This
  process's own CPU: with several processes on the CPU backend, ``jax.devices``
  lists the other processes' CPUs too.)
  """
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    key = jax.device_put(key, cpu)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return np.asarray(order, np.int32)


def train_index_batches(
  key: jax.Array,
  epoch: int,
  num_examples: int,
  global_batch_size: int,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[np.ndarray]:
  """This host's example indices for steps ``start_step, ...`` of an epoch.

  Yields int32 (global_batch_size / process_count,) arrays, one per step, for
  ``steps_per_epoch(num_examples, global_batch_size) - start_step`` steps.
  Resuming at (epoch, step) with the same key continues the same order.
  ``process_index``/``process_count`` default to this process's.
  """
  rows = _host_rows(global_batch_size, process_index, process_count)
  order = epoch_permutation(key, epoch, num_examples)
  for step in range(
    start_step, steps_per_epoch(num_examples, global_batch_size)
  ):
    yield order[step * global_batch_size :][:global_batch_size][rows]


def eval_index_batches(
  num_examples: int,
  global_batch_size: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices int32, mask bool), this host's rows of in-order batches.

  All ``ceil(num_examples / global_batch_size)`` batches are full; the last
  one is padded with index 0 and mask False.
  """
  rows = _host_rows(global_batch_size, process_index, process_count)
  num_batches = -(-num_examples // global_batch_size)
  padded = np.arange(num_batches * global_batch_size, dtype=np.int32)
  mask = padded < num_examples
  padded[~mask] = 0
  for b in range(num_batches):
    batch = slice(b * global_batch_size, (b + 1) * global_batch_size)
    yield padded[batch][rows], mask[batch][rows]


def eval_batches(
  split: Split,
  global_batch_size: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[Batch]:
  """`Batch`es covering a host-memory split in order, each example once."""
  for indices, mask in eval_index_batches(
    len(split),
    global_batch_size,
    process_index=process_index,
    process_count=process_count,
  ):
    yield Batch(split.images[indices], split.labels[indices], mask)
