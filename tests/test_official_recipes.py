"""The official TRADES and FAT recipes (their authors' code) as options:
start and step of TRADES' inner maximisation, FAT's per-step noise omega and
learning-rate schedule, against the values and statistics those codes
define."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import attacks, experiment_config
from cifs_jax.training import methods
from cifs_jax.training import train_state

NUM_EXAMPLES, SHAPE = 64, (16, 16, 3)  # 49,152 coordinates


def linear_logits(x):
  """A fixed linear model: (final logits (N, 10), no probes)."""
  weights = jnp.linspace(-1.0, 1.0, math.prod(SHAPE) * 10).reshape(-1, 10)
  return x.reshape(x.shape[0], -1) @ weights, []


def flat_loss(final_logits, probe_logits, y):
  """A loss with zero gradient: the attack's steps do not move (sign 0)."""
  del probe_logits, y
  return 0.0 * jnp.sum(final_logits, axis=-1)


def first_logit_loss(final_logits, probe_logits, y):
  """Logit 0 (with ``pixel_sum_logits``, gradient +1 for every pixel)."""
  del probe_logits, y
  return final_logits[:, 0]


def pixel_sum_logits(x):
  """Logit 0 is the sum of the pixels, the others 0."""
  total = jnp.sum(x.reshape(x.shape[0], -1), axis=-1, keepdims=True)
  return jnp.concatenate([total, jnp.zeros((x.shape[0], 9))], -1), []


def grey_images():
  return jnp.full((NUM_EXAMPLES, *SHAPE), 0.5, jnp.float32)


def labels():
  return jnp.zeros(NUM_EXAMPLES, jnp.int32)


@pytest.mark.parametrize(
  "start,expected_std", [("normal", 0.001), ("uniform", 0.3 / math.sqrt(3))]
)
def test_random_start_distribution(start, expected_std):
  """TRADES' start is x + 0.001 * N(0, 1); PGD-AT's uniform in [-eps, eps]
  (std eps / sqrt(3)). A flat loss leaves the start where it is."""
  config = attacks.PGDConfig(eps=0.3, step_size=0.01, num_steps=1, start=start)
  x = grey_images()
  start_point = attacks.pgd(
    linear_logits, x, labels(), jax.random.key(0), flat_loss, config
  )
  noise = np.asarray(start_point - x).ravel()
  # The std of n normal draws has relative standard error 1 / sqrt(2n).
  assert np.std(noise) == pytest.approx(expected_std, rel=0.02)
  assert abs(np.mean(noise)) < 5 * expected_std / math.sqrt(noise.size)
  if start == "normal":
    # Gaussian, not uniform: the kurtosis of a normal is 3 (uniform: 1.8).
    kurtosis = np.mean(noise**4) / np.var(noise) ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.1)


def test_trades_variant_is_the_official_recipe():
  """train_trades_cifar10.py: step 0.007, start 0.001 * N(0, 1);
  train_trades_mnist.py: step 0.01."""
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "trades"
  )
  assert config.train.method == "trades"
  assert config.trades.start == "normal"
  assert config.attack.step_size == 0.007
  fmnist = experiment_config.base_config()
  fmnist.data.name = "fashion_mnist"
  assert experiment_config.apply_variants(
    fmnist, "trades"
  ).attack.step_size == (0.01)


def test_trades_inner_step_is_the_configured_step():
  """From the official start, each step moves every pixel by the step size
  0.007 along a +1 gradient (while inside the 8/255 ball)."""
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "trades"
  )
  pgd_config = methods.attack_config(config.attack)
  x = grey_images()
  _, iterates = attacks.pgd(
    pixel_sum_logits,
    x,
    labels(),
    jax.random.key(1),
    first_logit_loss,
    dataclasses.replace(pgd_config, start=config.trades.start),
    return_trajectory=True,
  )
  # Steps 2 and 3 (the iterates are those after each step): from a start
  # within 0.005 of x, 3 steps stay inside the ball, the 5th would not.
  steps = np.diff(np.asarray(iterates[0]), axis=0)
  np.testing.assert_allclose(steps[:2], 0.007, atol=1e-6)
  assert pgd_config.num_steps * 0.007 > 8 / 255


@pytest.mark.parametrize("num_steps", [1, 4, 9])
def test_fat_noise_is_omega_per_step_and_independent(num_steps):
  """The official FAT adds omega * N(0, 1) at each step: after K steps with
  a flat loss the displacement is a sum of K independent draws, std
  omega * sqrt(K) (the same draw each step would give omega * K)."""
  omega = 0.001
  config = attacks.PGDConfig(
    eps=0.3, step_size=0.01, num_steps=num_steps, random_start=False
  )
  x = grey_images()
  x_adv = attacks.friendly_pgd(
    linear_logits,
    x,
    labels(),
    jax.random.key(2),
    flat_loss,
    config,
    tau=num_steps,
    omega=omega,
  )
  noise = np.asarray(x_adv - x).ravel()
  assert np.std(noise) == pytest.approx(omega * math.sqrt(num_steps), rel=0.02)
  assert abs(np.mean(noise)) < 5 * omega * math.sqrt(num_steps / noise.size)


def test_fat_noise_stops_with_the_example():
  """An example the model already misclassifies stops at the first check
  (tau = 0) and takes no step and no noise; omega = 0 adds nothing."""
  config = attacks.PGDConfig(
    eps=0.3, step_size=0.01, num_steps=3, random_start=False
  )
  x = grey_images()
  wrong = jnp.full(NUM_EXAMPLES, 5, jnp.int32)  # pixel_sum_logits says 0
  run = lambda y, omega: attacks.friendly_pgd(
    pixel_sum_logits, x, y, jax.random.key(3), flat_loss, config, 0, omega=omega
  )
  np.testing.assert_array_equal(run(wrong, 0.001), x)
  np.testing.assert_array_equal(run(labels(), 0.0), x)
  assert np.std(np.asarray(run(labels(), 0.001) - x)) > 0


def official_fat_rate(epoch: int, lr: float = 0.1) -> float:
  """FAT.py's adjust_learning_rate, called with the 1-based epoch."""
  rate = lr
  if epoch >= 60:
    rate = lr * 0.1
  if epoch >= 90:
    rate = lr * 0.01
  if epoch >= 110:
    rate = lr * 0.005
  return rate


def test_fat_official_schedule_is_the_official_codes():
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "fat_official"
  )
  experiment_config.validate(config)
  assert config.fat.omega == 0.001 and config.attack.step_size == 0.007
  steps_per_epoch = 10
  schedule = train_state.learning_rate_schedule(config.train, steps_per_epoch)
  for epoch in range(config.train.epochs):  # 0-based
    for step in (0, steps_per_epoch - 1):
      assert float(schedule(epoch * steps_per_epoch + step)) == pytest.approx(
        official_fat_rate(epoch + 1)
      ), epoch
  # The default FAT is the CIFS authors' copy: no noise, PGD-AT's schedule.
  default = experiment_config.apply_variants(
    experiment_config.base_config(), "fat"
  )
  assert default.fat.omega == 0.0 and default.train.lr_decays == ()


@pytest.mark.parametrize("decays", [(0.1,), (0.1, 0.1, 0.1), (0.1, 1.5)])
def test_lr_decays_need_one_factor_per_milestone(decays):
  config = experiment_config.base_config()  # milestones (75, 90)
  config.train.lr_decays = decays
  with pytest.raises(ValueError, match="config.train.lr_decays="):
    experiment_config.validate(config)


def test_unknown_trades_start_is_refused():
  config = experiment_config.base_config()
  config.trades.start = "gaussian"
  with pytest.raises(ValueError, match="trades.start"):
    experiment_config.validate(config)
  with pytest.raises(ValueError, match="start must be one of"):
    attacks.PGDConfig(start="gaussian")
