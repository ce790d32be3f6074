"""`Parallel`: data on 1 and 2 (fake CPU) devices, for pmap and for
jit(shard_map).

tests/conftest.py gives two CPU devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from cifs_jax import data
from cifs_jax.parallel import BATCH_AXIS as AXIS, MODES, Parallel


def _parallel(mode, num_devices):
  devices = jax.local_devices()[:num_devices]
  assert len(devices) == num_devices, "tests/conftest.py sets 2 CPU devices"
  return Parallel.create(mode, devices)


def _compile(fn, parallel, in_specs, out_specs):
  """`fn` as the training step would be compiled: per-device code."""
  if parallel.mode == "pmap":
    return jax.pmap(
      fn, axis_name=AXIS, devices=list(parallel.mesh.devices.flat)
    )
  return jax.jit(
    jax.shard_map(
      fn, mesh=parallel.mesh, in_specs=in_specs, out_specs=out_specs
    )
  )


def _split(n, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return data.Split(
    images=rng.integers(0, 256, (n, size, size, 3), np.uint8),
    labels=np.arange(n, dtype=np.int32),
    num_classes=n,
  )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_devices", [1, 2])
@pytest.mark.parametrize("batch", [6, 8, 42])
def test_every_test_example_evaluated_once(mode, num_devices, batch):
  n = 41  # Divided by none of the batch sizes.
  parallel = _parallel(mode, num_devices)
  split = _split(n)

  def count(batch_):
    """Per-example counts of the masked labels, summed over devices."""
    counts = jax.ops.segment_sum(
      batch_.mask.astype(jnp.int32), batch_.labels, num_segments=n
    )
    return jax.lax.psum(counts, AXIS)

  step = _compile(count, parallel, in_specs=(P(AXIS),), out_specs=P())
  total = np.zeros(n, int)
  for host_batch in data.eval_batches(split, batch):
    sharded = parallel.shard(host_batch)
    if mode == "pmap":
      assert sharded.images.shape == (
        num_devices,
        batch // num_devices,
        8,
        8,
        3,
      )
    else:
      assert sharded.images.shape == (batch, 8, 8, 3)
      assert len(sharded.images.addressable_shards) == num_devices
    counts = step(sharded)
    total += np.asarray(parallel.unreplicate(counts))
  np.testing.assert_array_equal(total, 1)


def _gather_and_augment(key, split, indices):
  """What the training step does: take its rows, augment them on device.

  Per-example keys from the example index make the result independent of
  the devices.
  """
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(indices)
  return data.augment(keys, split.images[indices]), split.labels[indices]


@pytest.mark.parametrize("mode", MODES)
def test_training_batches_same_on_1_and_2_devices(mode):
  split, key, global_batch = _split(20), jax.random.key(3), 8
  host = _parallel("shard_map", 1).replicate(split)  # Reference.
  expected = [
    _gather_and_augment(key, host, jnp.asarray(indices))
    for indices in data.train_index_batches(key, 2, len(split), global_batch)
  ]
  for num_devices in (1, 2):
    parallel = _parallel(mode, num_devices)
    on_device = parallel.replicate(split)
    if mode == "pmap":
      assert on_device.images.shape == (num_devices, 20, 8, 8, 3)
    else:
      assert on_device.images.shape == (20, 8, 8, 3)
      assert on_device.images.sharding.is_fully_replicated
    step = _compile(
      functools.partial(_gather_and_augment, key),
      parallel,
      in_specs=(P(), P(AXIS)),
      out_specs=(P(AXIS), P(AXIS)),
    )
    batches = data.train_index_batches(key, 2, len(split), global_batch)
    for want, indices in zip(expected, batches, strict=True):
      images, labels = step(on_device, parallel.shard(indices))
      np.testing.assert_array_equal(
        np.reshape(images, (global_batch, 8, 8, 3)), want[0]
      )
      np.testing.assert_array_equal(np.reshape(labels, -1), want[1])


def test_bad_mesh_or_batch():
  parallel = _parallel("shard_map", 2)
  with pytest.raises(
    ValueError,
    match=r"parallel='pjit'.*\('pmap', "
    r"'shard_map'\)",
  ):
    Parallel.create("pjit")
  with pytest.raises(ValueError, match="single axis"):
    Parallel("pmap", Mesh(parallel.mesh.devices, ("data",)))
  with pytest.raises(
    ValueError, match="batch of 3 rows does not split over its 2 devices"
  ):
    parallel.shard(np.zeros(3))
