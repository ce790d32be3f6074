"""The compiled training step: device-count invariance, FAT, optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifs_jax import attacks, data, experiment_config, models
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax.training import step as step_lib, train_state


def smoke_config(*variants):
  """The smoke variant on a ResNet-10 of width 4: quick to compile."""
  config = experiment_config.apply_variants(
    experiment_config.base_config(), ",".join(("smoke",) + variants)
  )
  config.model.name = "resnet10"
  config.model.width = 4
  return config


def random_split(num_examples=48, seed=0):
  rng = np.random.default_rng(seed)
  return data.Split(
    rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8),
    rng.integers(0, 10, num_examples).astype(np.int32),
    10,
  )


def run_steps(
  config, state, split, parallel_mode, num_devices, num_steps=3, batch_size=16
):
  model = models.build_model(config.model, bn_axis_name=BATCH_AXIS)
  parallel = Parallel.create(parallel_mode, jax.local_devices()[:num_devices])
  step = parallel.compile(
    step_lib.make_train_step(model, config, data.augment_options(config.data)),
    sharded_args=(False, False, True),
  )
  state = parallel.replicate(state)
  device_split = parallel.replicate(split)
  for i in range(num_steps):
    indices = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)
    state, metrics = step(state, device_split, parallel.shard(indices))
  return jax.tree.map(np.asarray, parallel.unreplicate(state))


@pytest.mark.parametrize("method", ["pgd_at"])
def test_two_devices_equal_one_device(x64, method):
  """pmap and shard_map over 2 devices give the 1-device parameters after 3
  PGD-AT steps on the same global batches (float64, synced batch norm)."""
  config = smoke_config(method)
  split = random_split()
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 3)
  to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  state = state.replace(
    params=to64(state.params), batch_stats=to64(state.batch_stats)
  )
  single = run_steps(config, state, split, "pmap", 1)
  assert int(single.step) == 3
  changed = jax.tree.map(
    lambda a, b: np.max(np.abs(a - b)), single.params, state.params
  )
  assert min(jax.tree.leaves(changed)) > 0  # every parameter was trained
  for mode in ("pmap", "shard_map"):
    sharded = run_steps(config, state, split, mode, 2)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
      (sharded.params, sharded.batch_stats),
      (single.params, single.batch_stats),
    )


def test_learning_rate_schedule_and_weight_decay_match_reference():
  config = experiment_config.base_config().train
  steps_per_epoch = 390
  schedule = train_state.learning_rate_schedule(config, steps_per_epoch)
  rate_in_epoch = lambda epoch: float(schedule(epoch * steps_per_epoch))
  # PyTorch MultiStepLR([75, 90], 0.1) stepped per epoch, epochs from 0.
  assert rate_in_epoch(0) == pytest.approx(0.1)
  assert float(schedule(75 * steps_per_epoch - 1)) == pytest.approx(0.1)
  assert rate_in_epoch(75) == pytest.approx(0.01)
  assert float(schedule(90 * steps_per_epoch - 1)) == pytest.approx(0.01)
  assert rate_in_epoch(90) == pytest.approx(0.001)
  assert rate_in_epoch(119) == pytest.approx(0.001)
  # torch.optim.SGD(lr, momentum=0.9, weight_decay=2e-4), by hand:
  # d = g + wd * w; buf = momentum * buf + d; w -= lr * buf.
  optimizer = train_state.make_optimizer(config, steps_per_epoch)
  weights = jnp.array([1.0, -2.0])
  opt_state = optimizer.init(weights)
  grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 1.0])]
  expected_w, buffer = np.array([1.0, -2.0]), np.zeros(2)
  for grad in grads:
    updates, opt_state = optimizer.update(grad, opt_state, weights)
    weights = optax.apply_updates(weights, updates)
    buffer = 0.9 * buffer + (np.asarray(grad) + 2e-4 * expected_w)
    expected_w = expected_w - 0.1 * buffer
  np.testing.assert_allclose(weights, expected_w, rtol=1e-6)


def linear_logits_fn(weights):
  return lambda x: (x.reshape(x.shape[0], -1) @ weights, [])


def test_friendly_pgd_freezes_misclassified_examples():
  """FAT with tau = 0 leaves examples that are already wrong where they are
  and attacks the others like PGD, inside the eps-ball and [0, 1]."""
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, (32, 12)), jnp.float32)
  predicted = np.argmax(np.asarray(x @ weights), axis=1)
  labels = jnp.asarray(
    np.where(np.arange(32) % 2 == 0, predicted, (predicted + 1) % 3)
  )
  config = attacks.PGDConfig(
    eps=0.1, step_size=0.02, num_steps=10, random_start=False
  )
  loss = step_lib.defense_loss("none", beta=2.0)
  x_fat = attacks.friendly_pgd(
    linear_logits_fn(weights), x, labels, None, loss, config, tau=0
  )
  x_pgd = attacks.pgd(linear_logits_fn(weights), x, labels, None, loss, config)
  wrong_at_start = predicted != np.asarray(labels)
  np.testing.assert_array_equal(x_fat[wrong_at_start], x[wrong_at_start])
  assert np.all(np.abs(x_fat - x) <= 0.1 + 1e-6)
  assert np.all((x_fat >= 0) & (x_fat <= 1))
  # An example that PGD never fools is never stopped: FAT equals PGD there.
  never_fooled = ~wrong_at_start & (
    np.argmax(np.asarray(x_pgd @ weights), 1) == np.asarray(labels)
  )
  np.testing.assert_allclose(
    x_fat[never_fooled], x_pgd[never_fooled], atol=1e-6
  )
  # A larger tau perturbs at least as far on average.
  x_tau = attacks.friendly_pgd(
    linear_logits_fn(weights), x, labels, None, loss, config, tau=3
  )
  assert np.abs(x_tau - x).sum() >= np.abs(x_fat - x).sum()


@pytest.mark.parametrize("method", ["natural", "fat", "trades"])
def test_every_method_trains(method):
  config = smoke_config(method, "cas" if method == "fat" else "cifs")
  split = random_split(32)
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 2)
  trained = run_steps(config, state, split, "pmap", 2, num_steps=2)
  assert int(trained.step) == 2
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(trained.params))


def test_config_rejects_a_negative_unroll():
  config = experiment_config.base_config()
  config.attack.unroll = -1
  with pytest.raises(ValueError, match="config.attack.unroll=-1"):
    experiment_config.validate(config)
