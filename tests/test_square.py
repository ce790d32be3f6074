"""Square attack: schedule, gradient-free success, exact linear robustness."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax.attacks.objectives import AttackLoss
from cifs_jax.attacks.pgd import PGDConfig, pgd
from tests import linear_classifier

# The module (the package exports the function 'square' under its name).
square = importlib.import_module("cifs_jax.attacks.square")

square_with_queries = jax.jit(
  square.square_with_queries, static_argnums=0, static_argnames="config"
)

IMAGE = (4, 4, 2)  # H, W, C: 32 input values
NUM_CLASSES, NUM_POINTS = 4, 300
MODEL = linear_classifier.random_classifier(0, NUM_CLASSES, int(np.prod(IMAGE)))


def margins(logits, y):
  """f_y - max_{k != y} f_k, numpy (N,)."""
  rows = np.arange(len(y))
  others = np.where(np.eye(logits.shape[-1], dtype=bool)[y], -np.inf, logits)
  return logits[rows, y] - others.max(-1)


def test_window_sizes_follow_the_official_autoattack_schedule():
  """AutoAttack's Square (resc_schedule=False), 5,000 queries on 28x28: the
  sides 25, 18, 13, 9, 6, 4, 3, 2 start at queries 0, 11, 51, 201, 501,
  1001, 2001, 4001 and the last one runs to the end."""
  sizes = square.square_sizes(square.SquareConfig(eps=0.1), 28, 28)
  assert sizes.shape == (5000,)
  changes = np.flatnonzero(np.diff(sizes, prepend=-1))
  np.testing.assert_array_equal(
    changes, [0, 11, 51, 201, 501, 1001, 2001, 4001]
  )
  np.testing.assert_array_equal(sizes[changes], [25, 18, 13, 9, 6, 4, 3, 2])


def test_rescaled_schedule_stretches_the_halvings_to_the_budget():
  config = square.SquareConfig(eps=0.03, rescale_schedule=True)
  sizes = square.square_sizes(config, 32, 32)
  # p_selection(it) with it = int(i / 5000 * 10000); side round(sqrt(p 1024)).
  expected = {0: 29, 5: 29, 6: 20, 25: 20, 26: 14, 101: 10, 2500: 3, 4999: 1}
  assert {i: sizes[i] for i in expected} == expected
  assert np.all(np.diff(sizes) <= 0)


@pytest.mark.parametrize("anywhere", [False, True])
def test_official_placement_leaves_the_last_column_to_the_stripes(anywhere):
  """The official windows cover the last column only when they span the
  image, and both they and the initial stripes are constant down a column:
  the last column's perturbation is the same in every row."""
  _, y = linear_classifier.correctly_labelled_points(MODEL, 2, (64,) + IMAGE)
  x = jnp.full((64,) + IMAGE, 0.5, jnp.float32)  # no box clipping
  config = square.SquareConfig(
    eps=0.1, num_queries=200, window_anywhere=anywhere
  )
  x_adv, _ = square_with_queries(
    MODEL.logits_fn, x, jnp.asarray(y), jax.random.key(1), config=config
  )
  last_column = np.asarray(x_adv - x)[:, :, -1, :]  # (N, H, C)
  constant = np.all(last_column == last_column[:, :1], axis=(1, 2))
  assert np.all(constant) != anywhere


@pytest.fixture(scope="module")
def linear_run():
  """Square where about half the points are robust: x, y, x_adv, queries,
  config; the first 10 points start misclassified."""
  x, y = linear_classifier.correctly_labelled_points(
    MODEL, 1, (NUM_POINTS,) + IMAGE
  )
  y[:10] = (y[:10] + 1) % NUM_CLASSES  # misclassified from the start
  eps = 0.06
  config = square.SquareConfig(
    eps=eps,
    num_queries=500,
    num_restarts=2,
    rescale_schedule=True,
    window_anywhere=True,
  )
  x = jnp.asarray(x, jnp.float32)
  x_adv, queries = square_with_queries(
    MODEL.logits_fn, x, jnp.asarray(y), jax.random.key(0), config=config
  )
  return np.asarray(x), y, np.asarray(x_adv), np.asarray(queries), config


def test_success_approaches_the_exact_robust_accuracy(linear_run):
  x, y, x_adv, _, config = linear_run
  exact = MODEL.linf_robust(x, y, config.eps)
  exact[:10] = False
  square_robust = np.argmax(MODEL.logits(x_adv), -1) == y
  assert 0.3 < exact.mean() < 0.7
  # Never fools a point the exact answer calls robust; misses few others.
  assert np.all(square_robust[exact])
  assert square_robust.mean() <= exact.mean() + 0.03


def test_stays_in_the_ball_and_box_and_never_raises_the_margin(linear_run):
  x, y, x_adv, _, config = linear_run
  chex.assert_shape(x_adv, x.shape)
  assert np.abs(x_adv - x).max() <= config.eps * (1 + 1e-6)
  assert np.all((x_adv >= 0) & (x_adv <= 1))
  assert np.all(margins(MODEL.logits(x_adv), y) <= margins(MODEL.logits(x), y))
  unchanged = np.argmax(MODEL.logits(x_adv), -1) == y
  np.testing.assert_array_equal(x_adv[unchanged], x[unchanged])


def test_queries_stop_for_fooled_points(linear_run):
  x, y, x_adv, queries, config = linear_run
  budget = config.num_restarts * (config.num_queries + 1)
  np.testing.assert_array_equal(queries[:10], 0)  # misclassified: no query
  robust = np.argmax(MODEL.logits(x_adv), -1) == y
  np.testing.assert_array_equal(queries[10:][robust[10:]], budget)
  fooled = queries[10:][~robust[10:]]
  assert np.all((fooled >= 1) & (fooled < budget))
  assert np.median(fooled) < config.num_queries / 2


def test_same_key_same_result_and_per_example_keys(linear_run):
  x, y, x_adv, queries, config = linear_run
  again, again_queries = square_with_queries(
    MODEL.logits_fn,
    jnp.asarray(x),
    jnp.asarray(y),
    jax.random.key(0),
    config=config,
  )
  chex.assert_trees_all_close(
    (again, again_queries), (x_adv, queries), atol=0, rtol=0
  )
  # With one key per example, a point's run ignores the rest of the batch.
  keys = jax.random.split(jax.random.key(1), NUM_POINTS)
  small = square.SquareConfig(eps=config.eps, num_queries=50)
  full, _ = square_with_queries(
    MODEL.logits_fn, jnp.asarray(x), jnp.asarray(y), keys, config=small
  )
  part, _ = square_with_queries(
    MODEL.logits_fn,
    jnp.asarray(x[:7]),
    jnp.asarray(y[:7]),
    keys[:7],
    config=small,
  )
  chex.assert_trees_all_close(part, full[:7], atol=0, rtol=0)


def quantised_logits_fn(x):
  """MODEL on inputs rounded to multiples of 1/4: zero gradient a.e."""
  return MODEL.logits_fn(jnp.round(4 * x) / 4)


def test_succeeds_without_gradients_where_pgd_fails():
  x, y = linear_classifier.correctly_labelled_points(MODEL, 2, (64,) + IMAGE)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.argmax(quantised_logits_fn(x)[0], -1)
  eps = 0.3
  gradient = jax.grad(lambda v: quantised_logits_fn(v)[0].sum())(x)
  np.testing.assert_array_equal(gradient, 0.0)
  pgd_adv = pgd(
    quantised_logits_fn,
    x,
    y,
    None,
    AttackLoss(kind="cw"),
    PGDConfig(eps=eps, step_size=eps / 4, num_steps=20, random_start=False),
  )
  fooled = lambda adv: jnp.argmax(quantised_logits_fn(adv)[0], -1) != y
  assert not np.any(fooled(pgd_adv))
  square_adv, _ = square_with_queries(
    quantised_logits_fn,
    x,
    y,
    jax.random.key(0),
    config=square.SquareConfig(eps=eps, num_queries=300),
  )
  assert np.mean(fooled(square_adv)) > 0.9


def test_config_and_input_shape_are_validated():
  with pytest.raises(ValueError, match="norm"):
    square.SquareConfig(eps=0.1, norm="l1")
  with pytest.raises(ValueError, match="images"):
    square.square(
      MODEL.logits_fn,
      jnp.zeros((2, 32)),
      jnp.zeros(2, int),
      jax.random.key(0),
      square.SquareConfig(eps=0.1),
    )
