"""Square attack (Andriushchenko et al., ECCV 2020): score-based, L-inf.

Random search that needs only the final head's logits, never a gradient,
as AutoAttack standard runs it (fra31/auto-attack, ``square.py``): start
from vertical stripes of +-eps, then per query propose one square window,
set to x +- eps (one sign per channel) inside the window, and keep the
proposal where it lowers the margin ``f_y - max_{k != y} f_k`` (or, with
``SquareConfig.loss``, where it raises that loss). The window's
side shrinks with the schedule of ``square_sizes``: by default the one the
official AutoAttack runs (``SquareAttack(resc_schedule=False)``: the
halvings at fixed query counts, whatever the budget), optionally the
official Square's default, rescaled to a 10,000-query budget
(``rescale_schedule=True``). A point stops (and stops spending queries) once
its margin is <= 0.

Departure from the official code: each point draws its own window place and
signs (the official code draws one per query for the whole batch), so a
point's queries do not depend on the rest of the batch; each point's
proposals have the official distribution.

The query loop is a ``lax.while_loop`` that ends when every point is fooled
or the budget is spent; the window is a mask built from iota comparisons, so
shapes stay static while its size and place change. Restarts (each from
fresh stripes, on the points still robust) are a ``lax.scan``.

Shapes: ``x`` (N, H, W, C) float in [0, 1], ``y`` (N,) integer labels,
``key`` one PRNG key or (N,) per-example keys (then a point's queries do
not depend on the rest of the batch); eps in input units.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cifs_jax.attacks.objectives import AttackLoss, LogitsFn, LossFn
from cifs_jax.attacks.geometry import example_keys

Array = jax.Array

SQUARE_NORMS = ("linf",)
# The official schedule (``p_selection``): p_init is halved after each of
# these iterations (with ``rescale_schedule``, iterations of a 10,000-query
# budget: other budgets rescale the iteration).
_HALVING_ITERATIONS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclasses.dataclass(frozen=True)
class SquareConfig:
  """Settings of the Square attack (hashable: a static ``jax.jit`` argument).

  Defaults are AutoAttack standard's.

  Attributes:
    eps: L-inf radius (input units).
    norm: "linf".
    num_queries: iterations per restart (one forward pass each), on top of
      the query of the initial stripes.
    p_init: initial fraction of the image a window covers.
    num_restarts: runs, each on the points the earlier ones left robust.
    loss: the acceptance rule. None (AutoAttack's): keep a proposal where it
      lowers the final head's margin. A loss (e.g. Eq. 3's joint
      cross-entropy, the CIFS authors' reduced AutoAttack, as the reference's
      ``loss="ce"``): keep it where it raises that loss; the protocols pass
      each beta_atk's as ``square``'s ``loss_fn``. Either way a point stops
      once the final head is fooled.
    rescale_schedule: whether the window schedule is stretched to the
      budget (the official ``SquareAttack``'s default, ``resc_schedule``);
      False is the official AutoAttack's setting: with 5,000 queries the
      windows never shrink past the 4,000th query's.
    window_anywhere: whether a window may cover the last row or column of
      the image; False is the official code (``randint(0, H - size)``):
      there only a window that spans the image does, so the last row and
      column keep the initial stripes (which matters on tiny images only).
  """

  eps: float
  norm: str = "linf"
  num_queries: int = 5000
  p_init: float = 0.8
  num_restarts: int = 1
  loss: AttackLoss | None = None
  rescale_schedule: bool = False
  window_anywhere: bool = False

  def __post_init__(self):
    if self.norm not in SQUARE_NORMS:
      raise ValueError(
        f"norm must be one of {SQUARE_NORMS}, got {self.norm!r}."
      )
    if self.eps < 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}.")
    if self.num_queries < 1 or self.num_restarts < 1:
      raise ValueError("num_queries and num_restarts must be >= 1.")
    if not 0 < self.p_init <= 1:
      raise ValueError(f"p_init must be in (0, 1], got {self.p_init}.")


def square(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array,
  config: SquareConfig,
  *,
  loss_fn: LossFn | None = None,
) -> Array:
  """Square attack: an adversarial point within eps of x, or x itself.

  Args:
    logits_fn: x (N, H, W, C) -> (final_logits (N, K), [probe_logits]);
      only the final logits are queried.
    x: clean images, (N, H, W, C) in [0, 1].
    y: integer labels, (N,).
    key: a PRNG key or (N,) keys.
    config: the attack's settings.
    loss_fn: (final_logits, probe_logits, y) -> (N,) loss whose increase
      accepts a proposal, in place of ``config.loss``; None: ``config.loss``.

  Returns:
    (N, H, W, C): where a point's top-1 was turned away from y, the
    adversarial point (within eps of x in L-inf, inside [0, 1]); x elsewhere.
  """
  return square_with_queries(logits_fn, x, y, key, config, loss_fn=loss_fn)[0]


def square_with_queries(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array,
  config: SquareConfig,
  *,
  loss_fn: LossFn | None = None,
) -> tuple[Array, Array]:
  """``square``, also returning the queries spent on each point.

  Returns:
    (x_adv (N, H, W, C), queries (N,) int32): queries counts the forward
    passes each point took part in while still robust, over all restarts:
    0 for points x misclassifies, ``num_restarts * (num_queries + 1)`` for
    points that stay robust.
  """
  if x.ndim != 4:
    raise ValueError(f"Square needs images (N, H, W, C), got shape {x.shape}.")
  keys = example_keys(key, x.shape[0])
  loss_fn = config.loss if loss_fn is None else loss_fn
  sizes = jnp.asarray(square_sizes(config, *x.shape[1:3]))
  robust = jnp.argmax(logits_fn(x)[0], axis=-1) == y

  def restart(carry, index):
    x_adv, robust, queries = carry
    restart_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, index)
    x_best, spent = _run(
      logits_fn, x, y, restart_keys, robust, sizes, config, loss_fn
    )
    fooled = robust & (jnp.argmax(logits_fn(x_best)[0], axis=-1) != y)
    x_adv = jnp.where(fooled[:, None, None, None], x_best, x_adv)
    return (x_adv, robust & ~fooled, queries + spent), None

  start = (x, robust, jnp.zeros(y.shape, jnp.int32))
  (x_adv, _, queries), _ = lax.scan(
    restart, start, jnp.arange(config.num_restarts)
  )
  return x_adv, queries


def square_sizes(config: SquareConfig, height: int, width: int) -> np.ndarray:
  """The window's side at each iteration, (num_queries,) int32 pixels.

  The official ``p_selection`` (rescaled to a 10,000-query budget only with
  ``config.rescale_schedule``) gives the fraction p of the image; the side is
  ``round(sqrt(p * H * W))``, at least 1 and at most min(H, W) (both as the
  official code).
  """
  sizes = []
  for iteration in range(config.num_queries):
    scaled = (
      int(iteration / config.num_queries * 10000)
      if config.rescale_schedule
      else iteration
    )
    halvings = sum(scaled > it for it in _HALVING_ITERATIONS)
    p = config.p_init / 2**halvings
    sizes.append(max(int(round(np.sqrt(p * height * width))), 1))
  return np.minimum(np.array(sizes, np.int32), min(height, width))


def _margin_and_score(logits_fn, x, y, loss_fn):
  """(margin (N,), score (N,)) of one forward pass: the final head's margin
  (<= 0: fooled) and what a proposal must lower to be kept: the margin
  itself, or minus ``loss_fn`` (the reference's ``margin_and_loss``)."""
  logits, probe_logits = logits_fn(x)
  true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  others = jnp.where(
    jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits
  )
  margin = true - jnp.max(others, axis=-1)
  if loss_fn is None:
    return margin, margin
  return margin, -loss_fn(logits, probe_logits, y).astype(margin.dtype)


def _run(logits_fn, x, y, keys, todo, sizes, config, loss_fn):
  """One restart on the points ``todo`` (N,) bool.

  Returns:
    x_best (N, H, W, C), the lowest-score point found per example (only
    meaningful where ``todo``), and the queries spent per example (N,).
  """
  _, height, width, channels = x.shape
  split_keys = jax.vmap(jax.random.split)(keys)  # (N, 2)
  stripe_keys, query_keys = split_keys[:, 0], split_keys[:, 1]
  # Vertical stripes: one sign per column and channel.
  stripes = jax.vmap(
    lambda k: jax.random.rademacher(k, (1, width, channels), x.dtype)
  )(stripe_keys)
  x_best = jnp.clip(x + config.eps * stripes, 0.0, 1.0)
  margin, score = _margin_and_score(logits_fn, x_best, y, loss_fn)
  margin = jnp.where(todo, margin, -jnp.inf)
  rows = lax.broadcasted_iota(jnp.int32, (height, width, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (height, width, 1), 1)

  def propose(key, example, size):
    """x with one window set to x +- eps (a sign per channel): (H, W, C)."""
    top_key, left_key, sign_key = jax.random.split(key, 3)
    # The official code draws from [0, H - size): never on the last row or
    # column unless the window spans the image.
    extra = int(config.window_anywhere)
    top = jax.random.randint(
      top_key, (), 0, jnp.maximum(height - size + extra, 1)
    )
    left = jax.random.randint(
      left_key, (), 0, jnp.maximum(width - size + extra, 1)
    )
    sign = jax.random.rademacher(sign_key, (channels,), example.dtype)
    window = (
      (rows >= top)
      & (rows < top + size)
      & (cols >= left)
      & (cols < left + size)
    )
    return window, jnp.clip(example + config.eps * sign, 0.0, 1.0)

  def query(state):
    iteration, x_best, margin, score, spent = state
    active = margin > 0
    iteration_keys = jax.vmap(jax.random.fold_in, (0, None))(
      query_keys, iteration
    )
    window, corner = jax.vmap(propose, (0, 0, None))(
      iteration_keys, x, sizes[iteration]
    )
    candidate = jnp.where(window, corner, x_best)
    new_margin, new_score = _margin_and_score(logits_fn, candidate, y, loss_fn)
    better = active & (new_score < score)
    return (
      iteration + 1,
      jnp.where(better[:, None, None, None], candidate, x_best),
      jnp.where(better, new_margin, margin),
      jnp.where(better, new_score, score),
      spent + active.astype(jnp.int32),
    )

  def robust_left(state):
    margin = state[2]
    return (state[0] < config.num_queries) & jnp.any(margin > 0)

  start = (jnp.int32(0), x_best, margin, score, todo.astype(jnp.int32))
  _, x_best, _, _, spent = lax.while_loop(robust_left, query, start)
  return x_best, spent
