"""FAB-T: the targeted fast adaptive boundary attack, L-inf and L-2.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack" (ICML 2020), as AutoAttack's standard version runs it
(fra31/auto-attack, ``fab_base.py``/``fab_pt.py``). For each target class t
(the 2nd, 3rd, ... highest class of the clean logits), FAB linearises
``f_t - f_y`` at the iterate, projects both the iterate and the clean input
onto the linearised decision hyperplane intersected with the [0, 1] box
(``project_onto_hyperplane``), steps to a convex combination of the two
projections (biased towards the clean input by at most ``alpha_max``, with
overshoot ``eta``), and, once the iterate is adversarial, records it if it is
the closest yet and steps back towards the clean input by ``beta``. FAB
minimises the perturbation's norm; eps only decides success (and scales the
random starts of restarts after the first).

The attack sees the final head only: ``logits_fn(x)[0]``. Everything runs
under ``jax.jit`` with ``logits_fn`` and the config static; the iterations
are a ``lax.scan``, target classes and restarts further scans.

Shapes: ``x`` (N, ...) float in [0, 1], ``y`` (N,) integer labels, ``key``
one PRNG key or (N,) per-example keys (None without restarts); norms and eps
in input units. Inside, inputs are flattened to (N, D).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cifs_jax.attacks.objectives import LogitsFn, as_pytree
from cifs_jax.attacks.geometry import NORMS, example_keys

Array = jax.Array

# Weights of the hyperplane below this magnitude count as zero (the reference
# uses 0 for L-inf and 1e-8 for L-2).
_TINY = 1e-12
# Lower bound of the projections' norms in the step size alpha (reference).
_MIN_STEP_NORM = 1e-8


@dataclasses.dataclass(frozen=True)
class FABConfig:
  """Settings of FAB-T (hashable: a static argument of ``jax.jit``).

  Defaults are AutoAttack standard's (``fab_base.FABAttack``).

  Attributes:
    eps: radius within which a point found counts as a success (input
      units); also sets the random starts of restarts after the first.
    norm: "linf" or "l2", the norm minimised.
    num_steps: iterations per target class and restart.
    num_restarts: runs per target class; the first starts at x, the others
      at a random point at distance eps / 2 (the reference's scaling).
    num_target_classes: how many of the highest-scoring other classes to
      target, at most K - 1.
    alpha_max: largest weight of the clean input's projection in a step.
    eta: overshoot factor of the projections (> 1 crosses the boundary).
    beta: backward step towards x after an adversarial iterate, in (0, 1).
  """

  eps: float
  norm: str = "linf"
  num_steps: int = 100
  num_restarts: int = 1
  num_target_classes: int = 9
  alpha_max: float = 0.1
  eta: float = 1.05
  beta: float = 0.9

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    if self.eps < 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}.")
    if min(self.num_steps, self.num_restarts, self.num_target_classes) < 1:
      raise ValueError(
        "num_steps, num_restarts and num_target_classes must be >= 1."
      )
    if not (0 <= self.alpha_max <= 1 and self.eta > 0 and 0 < self.beta < 1):
      raise ValueError("Need 0 <= alpha_max <= 1, eta > 0, 0 < beta < 1.")


def fab_targeted(
  logits_fn: LogitsFn, x: Array, y: Array, key: Array | None, config: FABConfig
) -> Array:
  """FAB-T: an adversarial point within eps of x, or x itself.

  Per example, the target classes are tried in order (as the reference
  does) and the first that yields an adversarial point within eps is kept.

  Args:
    logits_fn: x (N, ...) -> (final_logits (N, K), [probe_logits]); only
      the final logits are attacked.
    x: clean inputs, (N, ...) in [0, 1].
    y: integer labels, (N,).
    key: a PRNG key or (N,) keys; used (and required) only with restarts.
    config: the attack's settings.

  Returns:
    (N, ...) like x: the adversarial point, within eps of x in
    ``config.norm`` and inside [0, 1], where FAB found one; x elsewhere
    (including points the clean input already misclassifies).
  """
  points, norms = fab_minimal_perturbations(logits_fn, x, y, key, config)
  return _first_success(points, norms, x, config.eps)


def fab_targeted_host_loop(
  logits_fn: LogitsFn, x: Array, y: Array, key: Array | None, config: FABConfig
) -> Array:
  """``fab_targeted`` with its loops driven from Python, for XLA:CPU (see
  ``apgd.apgd_host_loop``): each compiled call runs ``HOST_LOOP_STEPS``
  steps unrolled. Once every example has a success the remaining targets
  are skipped (the reference's early exit; the result is the same, the
  first target that succeeds). The arguments and result are
  ``fab_targeted``'s; not traceable: call it outside ``jax.jit``."""
  x, y, logits_fn = jnp.asarray(x), jnp.asarray(y), as_pytree(logits_fn)
  targets, misclassified = _host_targets(logits_fn, config, x, y)
  keys = example_keys(key, x.shape[0]) if config.num_restarts > 1 else None
  flat_x = x.reshape(x.shape[0], -1)
  points, norms = [], []
  for index in range(targets.shape[0]):
    best = (flat_x, jnp.full(y.shape, jnp.inf, flat_x.dtype))
    for restart in range(config.num_restarts):
      start = (
        flat_x
        if restart == 0
        else _random_start(keys, flat_x, index, restart, config)
      )
      carry = (start, flat_x, jnp.full(y.shape, jnp.inf, flat_x.dtype))
      for begin in range(0, config.num_steps, HOST_LOOP_STEPS):
        carry = _host_fab_steps(
          logits_fn,
          config,
          x.shape,
          min(HOST_LOOP_STEPS, config.num_steps - begin),
          carry,
          flat_x,
          y,
          targets[index],
        )
      best = _closer(best, carry[1:])
    points.append(best[0])
    norms.append(jnp.where(misclassified, 0.0, best[1]))
    if bool(jnp.all(jnp.any(jnp.stack(norms) <= config.eps, axis=0))):
      break
  points = jnp.where(
    misclassified[None, :, None], flat_x[None], jnp.stack(points)
  )
  return _first_success(
    points.reshape((len(norms),) + x.shape), jnp.stack(norms), x, config.eps
  )


# Steps per compiled call of ``fab_targeted_host_loop``.
HOST_LOOP_STEPS = 10


@functools.partial(jax.jit, static_argnums=(1,))
def _host_targets(logits_fn, config, x, y):
  """(targets (T, N), misclassified (N,)) of ``fab_minimal_perturbations``."""
  clean_logits = logits_fn(x)[0]
  return _ranked_targets(clean_logits, config), (
    jnp.argmax(clean_logits, axis=-1) != y
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _host_fab_steps(logits_fn, config, shape, length, carry, x0, y, target):
  """``length`` FAB steps (``_fab_step_function``), unrolled."""
  flat_logits = lambda flat: logits_fn(flat.reshape(shape))[0]  # noqa: E731
  step = _fab_step_function(flat_logits, x0, y, target, config)
  return lax.scan(step, carry, length=length, unroll=True)[0]


def _ranked_targets(clean_logits: Array, config: FABConfig) -> Array:
  """The target classes (T, N): the clean logits' 2nd, 3rd, ... classes."""
  num_targets = min(config.num_target_classes, clean_logits.shape[-1] - 1)
  ranked = jnp.argsort(-clean_logits, axis=-1)  # (N, K), best first
  return ranked[:, 1 : 1 + num_targets].T


def _first_success(points: Array, norms: Array, x: Array, eps: float):
  """Per example the point of the first target whose norm is within eps,
  else x: (N, ...) from points (T, N, ...) and norms (T, N)."""
  success = norms <= eps  # (T, N); inf (never adversarial) fails.
  first = jnp.argmax(success, axis=0)  # (N,)
  chosen = jnp.take_along_axis(
    points, first.reshape((1, -1) + (1,) * (x.ndim - 1)), axis=0
  )[0]
  found = jnp.any(success, axis=0)
  return jnp.where(found.reshape((-1,) + (1,) * (x.ndim - 1)), chosen, x)


def fab_minimal_perturbations(
  logits_fn: LogitsFn, x: Array, y: Array, key: Array | None, config: FABConfig
) -> tuple[Array, Array]:
  """The closest adversarial points FAB-T finds, one per target class.

  Args:
    logits_fn: x (N, ...) -> (final_logits (N, K), [probe_logits]).
    x: clean inputs, (N, ...) in [0, 1].
    y: integer labels, (N,).
    key: a PRNG key or (N,) keys; used (and required) only with restarts.
    config: the attack's settings; ``eps`` only scales random starts here.

  Returns:
    (points, norms): points (T, N, ...) and norms (T, N), T =
    min(num_target_classes, K - 1), target j being the (j + 2)-th highest
    class of the clean logits. Per target, the adversarial point (top-1 not
    y) of least ``config.norm`` distance to x found over all iterations and
    restarts, and that distance; x and inf where none was found. Points
    that x itself misclassifies get x and 0 for every target.
  """
  clean_logits = logits_fn(x)[0]
  targets = _ranked_targets(clean_logits, config)  # (T, N)
  num_targets = targets.shape[0]
  keys = example_keys(key, x.shape[0]) if config.num_restarts > 1 else None
  flat_x = x.reshape(x.shape[0], -1)

  def flat_logits(flat):
    return logits_fn(flat.reshape(x.shape))[0]

  def attack_target(_, target_and_index):
    target, index = target_and_index
    return None, _best_over_restarts(
      flat_logits, flat_x, y, target, keys, index, config
    )

  _, (points, norms) = lax.scan(
    attack_target, None, (targets, jnp.arange(num_targets))
  )
  misclassified = jnp.argmax(clean_logits, axis=-1) != y
  points = jnp.where(misclassified[None, :, None], flat_x[None], points)
  norms = jnp.where(misclassified[None], 0.0, norms)
  return points.reshape((num_targets,) + x.shape), norms


def _best_over_restarts(flat_logits, x0, y, target, keys, target_index, config):
  """Per example the least-norm of ``num_restarts`` runs: (N, D), (N,)."""

  def restart(best, index):
    start = (
      x0
      if keys is None
      else _random_start(keys, x0, target_index, index, config)
    )
    return _closer(
      best, _fab_run(flat_logits, x0, y, target, start, config)
    ), None

  none_yet = (x0, jnp.full(y.shape, jnp.inf, x0.dtype))
  if config.num_restarts == 1:
    return restart(none_yet, 0)[0]
  return lax.scan(restart, none_yet, jnp.arange(config.num_restarts))[0]


def _closer(best, candidate):
  """Per example the (point (N, D), norm (N,)) pair of least norm."""
  better = candidate[1] < best[1]
  return (
    jnp.where(better[:, None], candidate[0], best[0]),
    jnp.where(better, candidate[1], best[1]),
  )


def _random_start(keys, x0, target_index, restart, config):
  """x0 itself for restart 0, else a point at distance eps / 2 (reference)."""

  def offset(key):
    key = jax.random.fold_in(jax.random.fold_in(key, target_index), restart)
    if config.norm == "linf":
      return jax.random.uniform(key, x0.shape[1:], x0.dtype, -1.0, 1.0)
    return jax.random.normal(key, x0.shape[1:], x0.dtype)

  t = jax.vmap(offset)(keys)
  start = x0 + 0.5 * config.eps * t / _norm(t, config.norm)[:, None]
  return jnp.where(restart > 0, jnp.clip(start, 0.0, 1.0), x0)


def _fab_run(flat_logits, x0, y, target, start, config):
  """One run of ``num_steps`` FAB iterations towards ``target``.

  Args:
    flat_logits: (N, D) -> final logits (N, K).
    x0: clean inputs (N, D); y, target: (N,) classes.
    start: the first iterate, (N, D) in [0, 1].
    config: the attack's settings.

  Returns:
    The least-norm adversarial iterate (N, D) (x0 where none) and its
    distance to x0 (N,) (inf where none).
  """
  none_yet = (start, x0, jnp.full(y.shape, jnp.inf, x0.dtype))
  step = _fab_step_function(flat_logits, x0, y, target, config)
  (_, best, best_norm), _ = lax.scan(step, none_yet, length=config.num_steps)
  return best, best_norm


def _fab_step_function(flat_logits, x0, y, target, config):
  """((iterate, best, best_norm), None) -> (the same, None): one FAB step
  towards ``target`` (see ``_fab_run``)."""
  project = functools.partial(project_onto_hyperplane, norm=config.norm)

  def linearised_boundary(x1):
    """The hyperplane w.z = b where the linearised f_t - f_y vanishes."""

    def difference(z):
      logits = flat_logits(z)
      diff = (
        jnp.take_along_axis(logits, target[:, None], axis=1)
        - jnp.take_along_axis(logits, y[:, None], axis=1)
      )[:, 0]
      return jnp.sum(diff), diff

    w, diff = jax.grad(difference, has_aux=True)(x1)
    return w, jnp.sum(w * x1, axis=1) - diff

  def step(carry, _):
    x1, best, best_norm = carry
    w, b = linearised_boundary(x1)
    d1, d2 = project(x1, w, b), project(x0, w, b)
    a1 = jnp.maximum(_norm(d1, config.norm), _MIN_STEP_NORM)
    a2 = jnp.maximum(_norm(d2, config.norm), _MIN_STEP_NORM)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, config.alpha_max)[:, None]
    x1 = jnp.clip(
      (x1 + config.eta * d1) * (1 - alpha) + (x0 + config.eta * d2) * alpha,
      0.0,
      1.0,
    )
    adversarial = jnp.argmax(flat_logits(x1), axis=-1) != y
    norm = _norm(x1 - x0, config.norm)
    closer = adversarial & (norm < best_norm)
    best = jnp.where(closer[:, None], x1, best)
    best_norm = jnp.where(closer, norm, best_norm)
    x1 = jnp.where(adversarial[:, None], x0 + config.beta * (x1 - x0), x1)
    return (x1, best, best_norm), None

  return step


def _norm(v: Array, norm: str) -> Array:
  """Per-row L-inf or L-2 norm of (M, D) -> (M,)."""
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=1))


def project_onto_hyperplane(
  points: Array, w: Array, b: Array, norm: str
) -> Array:
  """Least-norm steps onto {z : w.z = b} within the [0, 1] box, per row.

  For each row solves ``min ||d|| s.t. w.(t + d) = b, 0 <= t + d <= 1``
  exactly (the reference's ``projection_linf`` / ``projection_l2``). Along
  the direction that moves w.d towards the hyperplane, coordinate i has
  ``room_i`` before the box edge; the optimum moves every coordinate by
  ``min(lam, room_i)`` (L-inf) or ``|w_i| min(lam, room_i / |w_i|)`` (L-2)
  for the least lam reaching the hyperplane (``_piecewise_linear_root``).
  Where the hyperplane misses the box, every coordinate goes to its box
  edge (the closest the box gets to the hyperplane), as in the reference.

  Args:
    points: t, (M, D) in [0, 1].
    w: normals, (M, D); coordinates with |w_i| <= 1e-12 do not move.
    b: offsets, (M,).
    norm: "linf" or "l2".

  Returns:
    The steps d, (M, D).
  """
  gap = b - jnp.sum(w * points, axis=1)  # the change of w.t needed
  w = w * jnp.sign(gap)[:, None]  # now w.d must reach |gap| >= 0
  moves = jnp.abs(w) > _TINY
  room = jnp.where(moves, jnp.where(w > 0, 1.0 - points, points), 0.0)
  if norm == "linf":
    weight, cap = jnp.abs(w), room
  else:
    weight = jnp.square(w)
    cap = jnp.where(moves, room / jnp.where(moves, jnp.abs(w), 1.0), 0.0)
  lam = _piecewise_linear_root(jnp.where(moves, weight, 0.0), cap, jnp.abs(gap))
  scale = 1.0 if norm == "linf" else jnp.abs(w)
  return jnp.where(
    moves, jnp.sign(w) * scale * jnp.minimum(lam[:, None], cap), 0.0
  )


def _piecewise_linear_root(weight: Array, cap: Array, target: Array) -> Array:
  """Least lam >= 0 with sum_i weight_i min(lam, cap_i) = target, per row.

  The left side g(lam) is continuous, piecewise linear and nondecreasing,
  with kinks at the caps. After sorting the caps, g at each cap is a
  cumulative sum; the count of caps where g is still below the target
  locates lam's segment, on which g is linear.

  Args:
    weight: (M, D) >= 0.
    cap: (M, D) >= 0.
    target: (M,) >= 0.

  Returns:
    lam, (M,); inf where g never reaches the target.
  """
  order = jnp.argsort(cap, axis=1)
  cap = jnp.take_along_axis(cap, order, axis=1)
  weight = jnp.take_along_axis(weight, order, axis=1)
  saturated = jnp.cumsum(weight * cap, axis=1)  # sum_{j<=k} w_j cap_j
  free = jnp.sum(weight, axis=1, keepdims=True) - jnp.cumsum(weight, axis=1)
  g_at_caps = saturated + cap * free  # (M, D), nondecreasing in k
  segment = jnp.sum(g_at_caps < target[:, None], axis=1)  # (M,) in [0, D]
  k = jnp.minimum(segment, cap.shape[1] - 1)[:, None]
  # On the segment ending at cap_k: caps j < k are saturated, the rest free.
  at = lambda a: jnp.take_along_axis(a, k, axis=1)[:, 0]
  saturated_before = at(saturated) - at(weight * cap)
  free_from = at(free) + at(weight)
  # free_from = 0 only where g is flat at 0 and the target is 0.
  lam = (target - saturated_before) / jnp.where(free_from > 0, free_from, 1.0)
  return jnp.where(segment == cap.shape[1], jnp.inf, jnp.maximum(lam, 0.0))
