"""Projected gradient ascent on the input: PGD (L-inf, L-2), FGSM, C&W-inf,
FAT's early-stopped PGD.

Every attack here is ``pgd`` with some ``PGDConfig``: FGSM is one step of size
eps from the clean input (``fgsm_config``); C&W-inf is L-inf PGD on the C&W
margin (``AttackLoss(kind="cw")``). All are pure functions of
``(logits_fn, x, y, key)`` and static settings (the loss and the config, both
hashable), so they run under ``jax.jit``, inside a pmap'd or shard_map'd
training step, and on a batch sharded over devices: examples never interact.

The step loop is one ``lax.scan`` (``unroll`` steps per iteration, by default
chosen per backend by ``geometry.loop_unroll``; docs/design.md §10),
restarts another; there is no host round-trip. On CPU, where XLA runs a
loop's body about 3x slower, both are unrolled fully up to
``PGD_CPU_MAX_UNROLL`` steps in all, and longer restarts run side by side
(``unrolling``). PGD-100 of a width-8 ResNet-10 at batch 256: 3,283
instead of about 1,000 input-gradient passes per second (compiled in about
20 s); PGD-20 x 5 restarts: about 1,000 in a loop, 2,283 side by side; of a
width-16 CIFS ResNet-10, PGD-100: 1,636 instead of 295 (benchmarks/README.md).
After every step the iterate is projected back onto the intersection of the
eps-ball around ``x`` and the [0, 1] box.

Shapes: ``x`` is (N, ...) float in [0, 1] (images are (N, H, W, C)), ``y`` is
(N,) integer labels, ``key`` one PRNG key or (N,) per-example keys; eps and
step sizes are in input units (pixel values / 255 for 8-bit images).
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from cifs_jax.attacks.geometry import (
  AUTO_UNROLL,
  NORMS,
  TINY,
  ascent_direction,
  example_keys,
  keep_stronger,
  loop_unroll,
  project,
)
from cifs_jax.attacks.objectives import LogitsFn, LossFn

Array = jax.Array

# On CPU, PGD unrolls its steps and restarts fully up to this many steps in
# all: its step compiles about 10x faster than APGD's (``loop_unroll``).
PGD_CPU_MAX_UNROLL = 100

# ``unrolling``'s restarts entry when the restarts run side by side, as one
# batch of num_restarts x N (no loop).
PARALLEL_RESTARTS = 0


# Random starts: "uniform" in the eps-ball (Madry et al.'s PGD), or "normal":
# x + NORMAL_START_STD * N(0, 1) per coordinate (the official TRADES code's
# start, also FAT's "normal_distribution_randominit").
START_DISTRIBUTIONS = ("uniform", "normal")
NORMAL_START_STD = 0.001


@dataclasses.dataclass(frozen=True)
class PGDConfig:
  """Settings of a PGD attack (hashable: a static argument of ``jax.jit``).

  Attributes:
    eps: radius of the perturbation ball (input units).
    step_size: length of each step, in the attack's norm (input units).
    num_steps: number of gradient steps.
    norm: "linf" (sign of the gradient) or "l2" (normalised gradient).
    random_start: start from a random draw around ``x`` (else from ``x``).
    start: the random start's distribution, one of ``START_DISTRIBUTIONS``;
      either way the start is projected onto the ball and [0, 1] before the
      first gradient.
    num_restarts: independent runs (each from its own random start); per
      example the first run that fools the final head is kept, else the one
      with the highest loss. More than one needs ``random_start``.
    unroll: steps per iteration of the compiled loop (``lax.scan``'s
      unroll; a multiple of ``num_steps`` also unrolls that many restarts);
      0 (the default) picks per backend (``unrolling``).
  """

  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = 10
  norm: str = "linf"
  random_start: bool = True
  start: str = "uniform"
  num_restarts: int = 1
  unroll: int = AUTO_UNROLL

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    if self.start not in START_DISTRIBUTIONS:
      raise ValueError(
        f"start must be one of {START_DISTRIBUTIONS}, got {self.start!r}."
      )
    if self.eps < 0 or self.step_size < 0:
      raise ValueError("eps and step_size must be >= 0.")
    if self.num_steps < 1 or self.num_restarts < 1:
      raise ValueError("num_steps and num_restarts must be >= 1.")
    if self.unroll < AUTO_UNROLL:
      raise ValueError(f"unroll must be >= 0 (0: automatic), {self.unroll=}.")
    if self.num_restarts > 1 and not self.random_start:
      raise ValueError("Restarts without a random start repeat the same run.")


def reference_pgd_config(
  eps: float, num_steps: int, unroll: int = 0
) -> PGDConfig:
  """The CIFS authors' PGD-``num_steps`` (the paper's PGD-20 and PGD-100,
  and the per-epoch check of training): step eps / 10 from the clean input
  (no random start); ``unroll`` as ``PGDConfig``'s (0: per backend)."""
  return PGDConfig(
    eps=eps,
    step_size=0.1 * eps,
    num_steps=num_steps,
    random_start=False,
    unroll=unroll,
  )


def fgsm_config(eps: float = 8 / 255) -> PGDConfig:
  """FGSM (L-inf): one step of size eps from the clean input."""
  return PGDConfig(eps=eps, step_size=eps, num_steps=1, random_start=False)


def pgd(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array | None,
  loss_fn: LossFn,
  config: PGDConfig,
  *,
  return_trajectory: bool = False,
):
  """Maximises ``loss_fn`` over the eps-ball around ``x`` within [0, 1].

  Args:
    logits_fn: x (N, ...) -> (final_logits (N, K), [probe_logits (N, K)]).
    x: clean inputs, (N, ...) in [0, 1].
    y: integer labels, (N,); any per-example target that ``loss_fn`` takes
      (e.g. TRADES' natural logits) when ``config.num_restarts`` is 1 (with
      restarts, "fooled" means the final head's top-1 differs from y).
    key: a PRNG key, or (N,) keys (one per example: then an example's random
      starts do not depend on the rest of the batch); unused, and may be None,
      without ``config.random_start``.
    loss_fn: (final_logits, probe_logits, y) -> (N,) loss to maximise, e.g. an
      ``AttackLoss``.
    config: the attack's settings.
    return_trajectory: also return every iterate, for tests and debugging.

  Returns:
    The adversarial inputs, shaped like ``x``; with ``return_trajectory``, the
    pair (adversarial inputs, iterates of shape (num_restarts, num_steps,
    *x.shape)), the iterates being those after each step's projection.
  """
  chex.assert_equal_shape_prefix((x, y), 1)  # One target per example.
  keys = example_keys(key, x.shape[0]) if config.random_start else None
  step_unroll, restart_unroll = unrolling(config)
  ascend = functools.partial(
    _ascend,
    logits_fn,
    x,
    y,
    loss_fn=loss_fn,
    config=config,
    unroll=step_unroll,
    return_trajectory=return_trajectory,
  )

  def run(restart):
    if keys is None:
      return ascend(x)
    restart_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, restart)
    return ascend(_random_start(restart_keys, x, config))

  no_attack = (x, jnp.zeros(y.shape, bool), jnp.full(y.shape, -jnp.inf))

  def keep_stronger_run(best, x_adv):
    return keep_stronger(best, (x_adv, *_score(logits_fn, x_adv, y, loss_fn)))

  if config.num_restarts == 1:
    x_adv, trajectory = run(0)
    trajectories = None if trajectory is None else trajectory[None]
  elif restart_unroll == PARALLEL_RESTARTS:
    runs, trajectories = jax.vmap(run)(jnp.arange(config.num_restarts))
    best = no_attack
    for restart in range(config.num_restarts):
      best = keep_stronger_run(best, runs[restart])
    x_adv = best[0]
  else:

    def restart_step(best, restart):
      x_adv, trajectory = run(restart)
      return keep_stronger_run(best, x_adv), trajectory

    (x_adv, _, _), trajectories = lax.scan(
      restart_step,
      no_attack,
      jnp.arange(config.num_restarts),
      unroll=restart_unroll,
    )
  return (x_adv, trajectories) if return_trajectory else x_adv


def unrolling(config: PGDConfig, backend: str | None = None) -> tuple[int, int]:
  """(steps, restarts) per iteration of ``pgd``'s two compiled loops.

  ``loop_unroll`` of all ``num_steps * num_restarts`` steps on ``backend``
  (None: the default backend), PGD's cap on CPU being
  ``PGD_CPU_MAX_UNROLL``: steps first, then whole restarts. Automatic on
  CPU, restarts that do not fit the cap (PGD-100 or C&W-inf with 5
  restarts) run side by side (``PARALLEL_RESTARTS``: a vmap, no loop; the
  batch is num_restarts times larger) when the steps of one fit it.
  """
  total = config.num_steps * config.num_restarts
  unroll = loop_unroll(
    config.unroll, total, backend, cpu_max=PGD_CPU_MAX_UNROLL
  )
  steps = min(unroll, config.num_steps)
  automatic_on_cpu = (
    config.unroll == AUTO_UNROLL and (backend or jax.default_backend()) == "cpu"
  )
  if automatic_on_cpu and unroll < total and steps == config.num_steps:
    return steps, PARALLEL_RESTARTS
  return steps, max(1, unroll // config.num_steps)


def _ascend(
  logits_fn, x, y, x_start, *, loss_fn, config, unroll, return_trajectory
):
  """One run of ``num_steps`` projected steps, ``unroll`` per iteration:
  (x_adv, iterates or None)."""
  gradient = _loss_gradient(logits_fn, y, loss_fn)

  def step(x_adv, _):
    grad, _ = gradient(x_adv)
    x_adv = _step(x_adv, grad, x, config)
    return x_adv, (x_adv if return_trajectory else None)

  x_start = project(x_start, x, config)
  return lax.scan(step, x_start, length=config.num_steps, unroll=unroll)


def friendly_pgd(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array | None,
  loss_fn: LossFn,
  config: PGDConfig,
  tau: int,
  *,
  omega: float = 0.0,
) -> Array:
  """FAT's early-stopped PGD (Zhang et al., 2020).

  Like one run of ``pgd``, except that before each step every example is
  checked: once the final head misclassifies it for the (tau + 1)-th time it
  is frozen where it is; the others take a step, plus ``omega * N(0, 1)``
  noise per coordinate (the official FAT code's omega, 0.001 there, "for
  escaping the local minimum"; 0 in the CIFS authors' copy), and are
  projected onto the eps-ball and [0, 1]. ``key``: as for ``pgd``; needed
  (not None) with ``random_start`` or ``omega > 0``. Returns (N, ...).
  """
  if config.num_restarts != 1:
    raise ValueError(
      "friendly_pgd runs once; num_restarts must be 1, got "
      f"{config.num_restarts}."
    )
  if omega < 0:
    raise ValueError(f"omega must be >= 0, got {omega}.")
  keys = None
  if config.random_start or omega > 0:
    keys = example_keys(key, x.shape[0])
  x_start = x
  if config.random_start:
    x_start = project(_random_start(keys, x, config), x, config)
  gradient = _loss_gradient(logits_fn, y, loss_fn)

  def step(carry, index):
    x_adv, budget, active = carry
    grad, final_logits = gradient(x_adv)
    wrong = jnp.argmax(final_logits, axis=-1) != y
    stop = active & wrong & (budget == 0)
    budget = jnp.where(active & wrong & ~stop, budget - 1, budget)
    active = active & ~stop
    keep = active.reshape(active.shape + (1,) * (x.ndim - 1))
    noise = 0.0
    if omega > 0:
      # Keys folded with the step number: independent of the start's draw.
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, index)
      noise = omega * jax.vmap(
        lambda k, example: jax.random.normal(k, example.shape, example.dtype)
      )(step_keys, x)
    x_adv = jnp.where(keep, _step(x_adv, grad, x, config, noise), x_adv)
    return (x_adv, budget, active), None

  budget = jnp.full(y.shape, tau, jnp.int32)
  (x_adv, _, _), _ = lax.scan(
    step,
    (x_start, budget, jnp.ones(y.shape, bool)),
    jnp.arange(config.num_steps),
    unroll=unrolling(config)[0],
  )
  return x_adv


def _loss_gradient(logits_fn, y, loss_fn):
  """x_adv -> (gradient of the summed loss w.r.t. x_adv, final logits)."""

  def total_loss(x_adv):
    final_logits, probe_logits = logits_fn(x_adv)
    return jnp.sum(loss_fn(final_logits, probe_logits, y)), final_logits

  return jax.grad(total_loss, has_aux=True)


def _step(x_adv, grad, x, config, noise=0.0):
  """One steepest-ascent step along ``grad`` (plus ``noise``), projected
  back."""
  direction = ascent_direction(grad, config.norm)
  return project(x_adv + config.step_size * direction + noise, x, config)


def _random_start(keys: Array, x: Array, config: PGDConfig) -> Array:
  """x plus a draw of ``config.start`` around it, per example: uniform in
  the ball of radius eps, or normal with std ``NORMAL_START_STD``."""

  def draw(key, example):
    if config.start == "normal":
      return NORMAL_START_STD * jax.random.normal(
        key, example.shape, example.dtype
      )
    if config.norm == "linf":
      return jax.random.uniform(
        key, example.shape, example.dtype, -config.eps, config.eps
      )
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, example.shape, example.dtype)
    direction /= jnp.maximum(jnp.linalg.norm(direction), TINY)
    # The radius of a uniform point in a d-ball has CDF (r / eps) ** d.
    radius = config.eps * jax.random.uniform(radius_key, (), example.dtype) ** (
      1.0 / example.size
    )
    return radius * direction

  return x + jax.vmap(draw)(keys, x)


def _score(logits_fn, x_adv, y, loss_fn):
  """(fooled (N,) bool: the final head's top-1 is wrong, loss (N,))."""
  final_logits, probe_logits = logits_fn(x_adv)
  fooled = jnp.argmax(final_logits, axis=-1) != y
  return fooled, loss_fn(final_logits, probe_logits, y).astype(jnp.float32)
