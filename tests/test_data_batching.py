"""Host-side batch indices: seeded epochs, exact resume, hosts, eval padding."""

import jax
import numpy as np
import pytest

from cifs_jax import data


def _epoch(key, epoch=0, n=103, batch=10, **kwargs):
  return list(data.train_index_batches(key, epoch, n, batch, **kwargs))


def test_steps_per_epoch_drops_the_last_partial_batch():
  assert data.steps_per_epoch(103, 10) == 10
  assert data.steps_per_epoch(100, 10) == 10
  assert data.steps_per_epoch(9, 10) == 0


def test_epoch_permutation():
  key = jax.random.key(0)
  order = data.epoch_permutation(key, 3, 1000)
  assert order.dtype == np.int32
  np.testing.assert_array_equal(np.sort(order), np.arange(1000))
  np.testing.assert_array_equal(order, data.epoch_permutation(key, 3, 1000))
  np.testing.assert_array_equal(
    order, data.epoch_permutation(jax.random.PRNGKey(0), 3, 1000)
  )
  assert not np.array_equal(order, data.epoch_permutation(key, 4, 1000))
  assert not np.array_equal(
    order, data.epoch_permutation(jax.random.key(1), 3, 1000)
  )


def test_train_batches_cover_the_epoch_without_repeats():
  key = jax.random.key(0)
  batches = _epoch(key)
  assert len(batches) == 10
  assert all(b.shape == (10,) and b.dtype == np.int32 for b in batches)
  seen = np.concatenate(batches)
  assert len(set(seen.tolist())) == 100
  np.testing.assert_array_equal(seen, data.epoch_permutation(key, 0, 103)[:100])


def test_same_seed_same_batches_and_exact_resume():
  key = jax.random.key(42)
  full = _epoch(key, epoch=5)
  np.testing.assert_array_equal(full, _epoch(jax.random.key(42), epoch=5))
  for step in (0, 1, 7, 10):
    resumed = _epoch(key, epoch=5, start_step=step)
    assert len(resumed) == 10 - step
    np.testing.assert_array_equal(
      np.reshape(resumed, (-1, 10)), np.reshape(full[step:], (-1, 10))
    )
  assert not np.array_equal(full, _epoch(key, epoch=6))


def test_hosts_split_each_global_batch():
  key = jax.random.key(0)
  whole = _epoch(key, batch=12, process_index=0, process_count=1)
  parts = [
    _epoch(key, batch=12, process_index=i, process_count=3) for i in range(3)
  ]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
      batch, np.concatenate([p[step] for p in parts])
    )
  with pytest.raises(ValueError, match="multiple of the number of hosts 3"):
    _epoch(key, batch=10, process_index=0, process_count=3)


@pytest.mark.parametrize(
  "n,batch,hosts", [(103, 10, 1), (103, 8, 2), (5, 8, 2), (96, 32, 1)]
)
def test_eval_batches_count_every_example_once(n, batch, hosts):
  counts = np.zeros(n, int)
  num_batches = []
  for host in range(hosts):
    host_batches = list(
      data.eval_index_batches(n, batch, process_index=host, process_count=hosts)
    )
    num_batches.append(len(host_batches))
    for indices, mask in host_batches:
      assert indices.shape == mask.shape == (batch // hosts,)
      assert mask.dtype == bool and indices.dtype == np.int32
      np.add.at(counts, indices[mask], 1)
      assert np.all(indices[~mask] == 0)
  assert num_batches == [-(-n // batch)] * hosts  # Same steps on all hosts.
  np.testing.assert_array_equal(counts, 1)


def test_eval_batches_of_a_split():
  rng = np.random.default_rng(0)
  split = data.Split(
    images=rng.integers(0, 256, (7, 4, 4, 1), np.uint8),
    labels=np.arange(7, dtype=np.int32),
    num_classes=10,
  )
  batches = list(data.eval_batches(split, 4))
  assert len(batches) == 2
  images, labels, mask = batches[1]
  np.testing.assert_array_equal(mask, [True, True, True, False])
  np.testing.assert_array_equal(labels[:3], [4, 5, 6])
  np.testing.assert_array_equal(images[:3], split.images[4:])
