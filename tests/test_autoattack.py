"""Tests of the AutoAttack ensemble: exact truth on linear models, bookkeeping,
distrust of components, compilation."""

import math

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax.attacks.objectives import AttackLoss
from tests.test_apgd import (
  LINEAR_CLASSES,
  LINEAR_DIM,
  exact_linf_robust,
  linear_model,
  robust_flags,
)
from tests import linear_classifier
from tests.test_attacks import IMAGE_SHAPE, _toy_cifs, _uniform

# The module (the package exports the function 'autoattack' under its name).
aa = importlib.import_module("cifs_jax.attacks.autoattack")

EPS = 0.1
W, B, LINEAR = linear_model(0)


def worst_for_class(logits_fn, x, y, key, target):
  """Stand-in component: the exact minimiser of the margin of y over class
  ``target`` for the module's linear model (x unchanged where y == target)."""
  del logits_fn, key
  direction = jnp.sign(W.T[y] - W.T[target])  # (N, D): sign of w_y - w_t.
  return jnp.where(
    (y == target)[:, None], x, jnp.clip(x - EPS * direction, 0.0, 1.0)
  )


def identity(logits_fn, x, y, key, config):
  """Stand-in component that never moves."""
  del logits_fn, y, key, config
  return x


def overshoot(logits_fn, x, y, key, config):
  """Stand-in component that fools from outside the ball (3 eps away)."""
  del logits_fn, key, config
  return jnp.clip(x - 3 * EPS * jnp.sign(W.T[y] - W.T[(y + 1) % 4]), 0, 1)


def class_components(attack=worst_for_class):
  """One stand-in per target class: {"class-j": factory}."""
  return {
    f"class-{j}": (lambda s, j=j: (attack, j)) for j in range(LINEAR_CLASSES)
  }


def linear_data(seed, n):
  x = jax.random.uniform(jax.random.key(seed), (n, LINEAR_DIM))
  y = jnp.argmax(LINEAR(x)[0], axis=-1)
  return x, y.at[: n // 10].set((y[: n // 10] + 1) % LINEAR_CLASSES)


def test_stand_in_components_give_the_exact_robust_accuracy():
  x, y = linear_data(1, 120)
  result = aa.autoattack(
    LINEAR,
    x,
    y,
    jax.random.key(2),
    eps=EPS,
    version="custom",
    attacks=list(class_components()),
    components=class_components(),
    batch_size=32,
  )
  exact = exact_linf_robust(W, B, x, y, EPS)
  exact &= np.asarray(jnp.argmax(LINEAR(x)[0], -1) == y)
  assert 0.2 < exact.mean() < 0.8
  np.testing.assert_array_equal(result.robust, exact)
  # The ensemble is never weaker than any of its components alone.
  for name in class_components():
    alone = aa.autoattack(
      LINEAR,
      x,
      y,
      jax.random.key(2),
      eps=EPS,
      version="custom",
      attacks=[name],
      components=class_components(),
      batch_size=32,
    )
    assert result.robust_accuracy <= alone.robust_accuracy
    assert np.all(alone.robust[result.robust])


def test_standard_version_on_a_linear_model():
  # APGD-CE and APGD-T for real; FAB-T and Square replaced by stand-ins.
  x, y = linear_data(3, 200)
  lines = []
  result = aa.autoattack(
    LINEAR,
    x,
    y,
    jax.random.key(4),
    eps=EPS,
    log=lines.append,
    components={
      "fab-t": lambda s: (identity, None),
      "square": lambda s: (identity, None),
    },
  )
  chex.assert_shape(result.x_adv, x.shape)
  assert list(result.accuracy) == [
    "clean",
    "apgd-ce",
    "apgd-t",
    "fab-t",
    "square",
  ]
  stages = list(result.accuracy.values())
  assert stages == sorted(stages, reverse=True)
  assert stages[-1] == result.robust_accuracy
  assert lines[0].startswith("initial accuracy: ")
  assert lines[1].startswith(
    f"robust accuracy after apgd-ce: {stages[1]:.2f} % ("
  )
  assert [s.name for s in result.stages] == list(result.accuracy)[1:]
  attacked = [s.attacked for s in result.stages]
  # Each stage attacks exactly the points the previous one left robust.
  np.testing.assert_allclose(attacked, np.array(stages[:-1]) * len(y) / 100)
  # Exact within a point; no provably robust point reported fooled.
  exact = exact_linf_robust(W, B, x, y, EPS)
  exact &= np.asarray(jnp.argmax(LINEAR(x)[0], -1) == y)
  assert np.all(result.robust[exact])
  assert result.robust_accuracy <= 100 * exact.mean() + 1
  # The flags agree with the model at the returned points, in ball and box.
  np.testing.assert_array_equal(
    result.robust, robust_flags(LINEAR, result.x_adv, y)
  )
  assert np.abs(result.x_adv - np.asarray(x)).max() <= EPS * (1 + 1e-5)
  assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
  np.testing.assert_array_equal(
    result.x_adv[result.robust], np.asarray(x)[result.robust]
  )


def test_points_fooled_from_outside_the_ball_stay_robust():
  x, y = linear_data(5, 64)
  result = aa.autoattack(
    LINEAR,
    x,
    y,
    jax.random.key(6),
    eps=EPS,
    version="custom",
    attacks=["overshoot"],
    components={"overshoot": lambda s: (overshoot, None)},
  )
  assert result.accuracy["overshoot"] == result.accuracy["clean"]
  assert not robust_flags(LINEAR, overshoot(None, x, y, None, None), y).all()


def test_a_shrinking_robust_set_reuses_a_few_compiled_sizes():
  traced = []

  def counting(logits_fn, x, y, key, target):
    traced.append((target, x.shape[0]))  # Runs once per compilation.
    return worst_for_class(logits_fn, x, y, key, target)

  components = class_components(counting)
  subset_sizes = set()
  for seed, n in [(7, 45), (9, 61)]:
    x, y = linear_data(seed, n)
    result = aa.autoattack(
      LINEAR,
      x,
      y,
      jax.random.key(seed),
      eps=EPS,
      version="custom",
      attacks=list(components),
      components=components,
      batch_size=16,
    )
    accuracies = np.array(list(result.accuracy.values()))
    subset_sizes |= {
      n % 16 for n in np.round(accuracies[:-1] * n / 100).astype(int)
    }
  assert {size for _, size in traced} <= {8, 16}
  assert len(traced) == len(set(traced))
  # Far fewer compilations than (component, remainder size) pairs met.
  assert len(traced) < LINEAR_CLASSES * len(subset_sizes)


@pytest.mark.parametrize(
  "num_points", [0, 1, 7, 8, 9, 33, 60, 100, 255, 256, 300]
)
def test_chunk_sizes_cover_the_points_with_little_padding(num_points):
  sizes = aa.chunk_sizes(num_points, 64)
  rest = num_points % 64
  padding = sum(sizes) - num_points
  assert 0 <= padding < max(aa.MIN_CHUNK, rest / 4)
  assert sizes.count(64) == num_points // 64 + (rest > 56)
  assert len(sizes) - sizes.count(64) <= 1  # one more compiled size at most
  assert all(s % aa.MIN_CHUNK == 0 for s in sizes)
  # Few sizes: 8 up to 64, then four per doubling.
  assert len({aa.chunk_sizes(n, 256)[-1] for n in range(1, 257)}) == 16


def test_versions_follow_the_reference_and_the_authors():
  loss = AttackLoss(beta=2.0)
  names, settings = aa.plan("joint", None, eps=EPS, norm="linf", loss=loss)
  assert names == ("apgd-ce", "square")
  _, config = aa.COMPONENTS["apgd-ce"](settings)
  assert (config.num_restarts, config.loss, config.num_steps) == (5, loss, 100)
  names, settings = aa.plan("standard", None, eps=EPS, norm="l2", loss=None)
  assert names == ("apgd-ce", "apgd-t", "fab-t", "square")
  _, config = aa.COMPONENTS["apgd-t"](settings)
  assert (config.num_target_classes, config.num_restarts, config.norm) == (
    9,
    1,
    "l2",
  )
  assert settings.square_queries == 5000
  names, settings = aa.plan("rand", None, eps=EPS, norm="linf", loss=None)
  assert names == ("apgd-ce", "apgd-dlr") and settings.eot_iter == 20
  for version, attacks, loss in [
    ("joint", None, None),
    ("custom", None, None),
    ("standard", ["apgd-ce"], None),
    ("plus", None, None),
  ]:
    with pytest.raises(ValueError):
      aa.plan(version, attacks, eps=EPS, norm="linf", loss=loss)


@pytest.mark.slow
def test_joint_version_on_a_model_with_probes():
  logits_fn = _toy_cifs(6, "full")
  x = _uniform(4, (64,) + IMAGE_SHAPE)
  y = jnp.argmax(logits_fn(x)[0], axis=-1)
  result = aa.autoattack(
    logits_fn,
    x,
    y,
    jax.random.key(5),
    eps=8 / 255,
    version="joint",
    loss=AttackLoss(beta=math.inf),
    components={"square": lambda s: (identity, None)},
  )
  assert list(result.accuracy) == ["clean", "apgd-ce", "square"]
  assert result.accuracy["apgd-ce"] < result.accuracy["clean"]
  np.testing.assert_array_equal(
    result.robust, robust_flags(logits_fn, result.x_adv, y)
  )


@pytest.mark.slow
def test_rand_version_on_a_model_with_a_random_gradient():
  def randomised(x, key):  # Logits W x + b; gradient s W, P(s = 1) = 0.8.
    sign = jnp.where(jax.random.uniform(key) < 0.8, 1.0, -1.0)
    scores = x @ W
    fixed = jax.lax.stop_gradient(scores)
    return fixed + sign * (scores - fixed) + B, []

  x, y = linear_data(10, 100)
  result = aa.autoattack(
    randomised, x, y, jax.random.key(11), eps=EPS, version="rand"
  )
  exact = exact_linf_robust(W, B, x, y, EPS)
  exact &= np.asarray(jnp.argmax(LINEAR(x)[0], -1) == y)
  assert list(result.accuracy) == ["clean", "apgd-ce", "apgd-dlr"]
  assert np.all(result.robust[exact])
  assert result.robust_accuracy <= 100 * exact.mean() + 3


def test_the_real_standard_ensemble_on_a_linear_image_classifier():
  # All four real components, with reduced budgets, on images (Square
  # needs them); exact L-inf robustness of the linear model is the truth.
  model = linear_classifier.random_classifier(3, 4, 4 * 4 * 2)
  x, y = linear_classifier.correctly_labelled_points(model, 4, (48, 4, 4, 2))
  x, y = x.astype(np.float32), y.astype(np.int32)
  reduced = {
    "apgd-ce": (aa.apgd, aa.APGDConfig(eps=EPS, num_steps=10)),
    "apgd-t": (
      aa.apgd,
      aa.APGDConfig(eps=EPS, num_steps=10, loss="dlr-targeted"),
    ),
    "fab-t": (aa.fab_targeted, aa.FABConfig(eps=EPS, num_steps=10)),
    "square": (aa.square, aa.SquareConfig(eps=EPS, num_queries=50)),
  }
  lines = []
  result = aa.autoattack(
    model.logits_fn,
    x,
    y,
    jax.random.key(8),
    eps=EPS,
    log=lines.append,
    batch_size=16,
    components={name: (lambda s, c=c: c) for name, c in reduced.items()},
  )
  assert list(result.accuracy) == ["clean"] + list(reduced)
  assert len(lines) == 5
  stages = list(result.accuracy.values())
  assert stages == sorted(stages, reverse=True)
  assert stages[0] == 100.0 and stages[-1] == result.robust_accuracy
  exact = model.linf_robust(x, y, EPS)
  assert 0.2 < exact.mean() < 0.8
  assert np.all(result.robust[exact])  # never claims a provably robust point
  assert result.robust_accuracy <= 100 * (exact.mean() + 1 / 48)
  # Re-checked: the flags are the model's verdict at the returned points.
  np.testing.assert_array_equal(
    result.robust, robust_flags(model.logits_fn, result.x_adv, y)
  )
  assert np.abs(result.x_adv - x).max() <= EPS * (1 + 1e-5)
  assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
