"""FAB-T against closed-form answers: projections and linear models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from cifs_jax.attacks import fab
from tests import linear_classifier

fab_minimal = jax.jit(
  fab.fab_minimal_perturbations, static_argnums=0, static_argnames="config"
)
fab_targeted = jax.jit(
  fab.fab_targeted, static_argnums=0, static_argnames="config"
)


def random_hyperplanes(seed, rows=60, dim=10):
  """Points in [0, 1], normals with some zero entries, and offsets whose
  hyperplanes pass near, far from (box binds) and outside the box."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(0, 1, (rows, dim))
  w = rng.normal(size=(rows, dim)) * (rng.uniform(size=(rows, dim)) > 0.2)
  reach = np.abs(w).sum(1)  # |w.t - b| is at most this inside the box
  b = (w * t).sum(1) + rng.uniform(-1, 1, rows) * reach
  return t, w, b


def box_feasible(t, w, b):
  """(M,) bool: the hyperplane w.z = b meets the box [0, 1]^D."""
  low = np.minimum(w * 0, w).sum(1)
  high = np.maximum(w * 0, w).sum(1)
  return (low <= b) & (b <= high)


def linf_projection_by_linprog(t, w, b):
  """min lam s.t. w.d = b - w.t, |d_i| <= lam, 0 <= t + d <= 1."""
  dim = len(t)
  cost = np.r_[np.zeros(dim), 1.0]
  eye = np.eye(dim)
  bound = np.c_[np.r_[eye, -eye], -np.ones(2 * dim)]  # +-d - lam <= 0
  result = optimize.linprog(
    cost,
    A_ub=bound,
    b_ub=np.zeros(2 * dim),
    A_eq=np.r_[w, 0.0][None],
    b_eq=[b - w @ t],
    bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)],
    method="highs",
  )
  assert result.status == 0
  return result.fun


def l2_projection_by_bisection(t, w, b):
  """KKT form d = clip(mu w, -t, 1 - t); bisection on mu for w.d = b - w.t."""
  gap = b - w @ t
  step = lambda mu: np.clip(mu * w, -t, 1 - t)
  low, high = (0.0, 1e6) if gap > 0 else (-1e6, 0.0)
  for _ in range(200):
    mid = (low + high) / 2
    low, high = (mid, high) if w @ step(mid) < gap else (low, mid)
  return step((low + high) / 2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_box_constrained_minimum(x64, norm):
  t, w, b = random_hyperplanes(seed=1)
  d = np.asarray(fab.project_onto_hyperplane(t, w, b, norm))
  feasible = box_feasible(t, w, b)
  assert 10 < feasible.sum() < len(t) - 10
  # Some feasible rows have the box binding.
  assert np.any(np.isclose(t + d, 0) | np.isclose(t + d, 1))
  assert np.all((t + d >= -1e-12) & (t + d <= 1 + 1e-12))
  np.testing.assert_allclose(
    (w * (t + d)).sum(1)[feasible], b[feasible], atol=1e-9
  )
  for row in np.flatnonzero(feasible):
    if norm == "linf":
      np.testing.assert_allclose(
        np.abs(d[row]).max(),
        linf_projection_by_linprog(t[row], w[row], b[row]),
        rtol=1e-7,
      )
    else:
      np.testing.assert_allclose(
        d[row], l2_projection_by_bisection(t[row], w[row], b[row]), atol=1e-8
      )
  # Infeasible: every moving coordinate at the box edge nearest the plane.
  infeasible = ~feasible
  towards = np.sign(w * (b - (w * t).sum(1))[:, None])
  corner = np.where(towards > 0, 1.0, np.where(towards < 0, 0.0, t))
  np.testing.assert_allclose(
    (t + d)[infeasible], corner[infeasible], atol=1e-12
  )


NUM_CLASSES, DIM, NUM_POINTS = 4, 12, 300


def linear_problem(norm):
  """Points far from the box edges, labelled by the model; the exact
  boundary distances per FAB target; whether the box is inactive there."""
  model = linear_classifier.random_classifier(0, NUM_CLASSES, DIM)
  x, y = linear_classifier.correctly_labelled_points(
    model, 1, (NUM_POINTS, DIM), 0.3, 0.7
  )
  targets = np.argsort(-model.logits(x), axis=-1)[:, 1:]  # FAB's order
  exact = model.boundary_distances(x, y, targets, norm)
  closest = model.closest_boundary_points(x, y, targets, norm)
  inside = np.all((closest >= 0) & (closest <= 1), axis=-1)  # (N, T)
  return model, x, y, exact, inside


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_norms_match_the_exact_ones_on_a_linear_model(norm):
  model, x, y, exact, inside = linear_problem(norm)
  assert inside.mean() > 0.5
  config = fab.FABConfig(eps=0.1, norm=norm)
  points, norms = fab_minimal(
    model.logits_fn,
    jnp.asarray(x, jnp.float32),
    jnp.asarray(y),
    None,
    config=config,
  )
  chex.assert_shape(points, (NUM_CLASSES - 1, NUM_POINTS, DIM))
  norms = np.asarray(norms).T  # (N, T)
  # Every point found is adversarial, at the distance stated.
  points = np.asarray(points).transpose(1, 0, 2)
  logits = model.logits(points.reshape(-1, DIM)).reshape(
    NUM_POINTS, -1, NUM_CLASSES
  )
  assert np.all(np.argmax(logits, -1) != y[:, None])
  distance = (
    np.abs(points - x[:, None]).max(-1)
    if norm == "linf"
    else np.linalg.norm(points - x[:, None], axis=-1)
  )
  np.testing.assert_allclose(norms, distance, rtol=1e-5)
  # Nothing beats the exact minimum over all classes (a lower bound) ...
  assert np.all(norms >= exact.min(-1, keepdims=True) * (1 - 1e-5))
  # ... and for each target FAB gets within 2 % of that target's boundary.
  assert np.all(norms[inside] <= 1.02 * exact[inside])
  # Over the targets tried: the robustness radius within 2 %.
  nearest = exact.argmin(-1)
  rows = inside[np.arange(NUM_POINTS), nearest]
  np.testing.assert_allclose(
    norms.min(-1)[rows], exact.min(-1)[rows], rtol=0.02
  )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_targeted_keeps_successes_within_eps_and_in_the_box(norm):
  model, x, y, exact, _ = linear_problem(norm)
  eps = float(np.median(exact.min(-1)))
  config = fab.FABConfig(eps=eps, norm=norm, num_steps=30, num_restarts=2)
  x = jnp.asarray(x[:, :, None], jnp.float32)  # (N, D, 1): any input shape
  key = jax.random.key(0)
  x_adv = fab_targeted(model.logits_fn, x, jnp.asarray(y), key, config=config)
  chex.assert_shape(x_adv, x.shape)
  chex.assert_trees_all_close(
    x_adv,
    fab_targeted(model.logits_fn, x, jnp.asarray(y), key, config=config),
    atol=0,
    rtol=0,
  )
  delta = np.asarray(x_adv - x).reshape(NUM_POINTS, -1)
  size = (
    np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)
  )
  assert np.all(size <= eps * (1 + 1e-6))
  assert np.all((np.asarray(x_adv) >= 0) & (np.asarray(x_adv) <= 1))
  fooled = np.argmax(model.logits(np.asarray(x_adv)), -1) != y
  # Not fooled: returned unchanged. Fooled: about half (eps is the median
  # radius, FAB's norms within 2 % of it).
  assert np.all(size[~fooled] == 0)
  assert 0.4 < fooled.mean() <= (exact.min(-1) <= eps).mean() + 1e-9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_host_loop_runs_the_same_attack(norm):
  """``fab_targeted_host_loop`` (25 steps: calls of 10, 10 and 5; two
  restarts) gives ``fab_targeted``'s points, misclassified points
  included, up to float rounding."""
  model, x, y, exact, _ = linear_problem(norm)
  y = y.copy()
  y[:3] = (y[:3] + 1) % NUM_CLASSES  # misclassified: returned unchanged
  eps = float(np.median(exact.min(-1)))
  config = fab.FABConfig(eps=eps, norm=norm, num_steps=25, num_restarts=2)
  x, y, key = jnp.asarray(x, jnp.float32), jnp.asarray(y), jax.random.key(1)
  traced = fab_targeted(model.logits_fn, x, y, key, config=config)
  driven = fab.fab_targeted_host_loop(model.logits_fn, x, y, key, config)
  chex.assert_trees_all_close(driven, traced, atol=1e-5)
  np.testing.assert_array_equal(driven[:3], x[:3])
  assert 0 < np.mean(np.any(np.asarray(traced) != np.asarray(x), -1)) < 1


def test_misclassified_points_are_returned_unchanged():
  model = linear_classifier.random_classifier(0, NUM_CLASSES, DIM)
  x, y = linear_classifier.correctly_labelled_points(model, 2, (8, DIM))
  wrong = (y + 1) % NUM_CLASSES
  config = fab.FABConfig(eps=1.0, num_steps=5)
  x = jnp.asarray(x, jnp.float32)
  points, norms = fab_minimal(
    model.logits_fn, x, jnp.asarray(wrong), None, config=config
  )
  np.testing.assert_array_equal(norms, 0.0)
  np.testing.assert_array_equal(points, jnp.broadcast_to(x, points.shape))
  np.testing.assert_array_equal(
    fab_targeted(model.logits_fn, x, jnp.asarray(wrong), None, config=config), x
  )


def test_config_is_validated():
  with pytest.raises(ValueError, match="norm"):
    fab.FABConfig(eps=0.1, norm="l1")
  with pytest.raises(ValueError, match="beta"):
    fab.FABConfig(eps=0.1, beta=1.0)
