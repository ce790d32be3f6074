"""APGD (Croce & Hein, ICML 2020): PGD with momentum and its own step size.

The algorithm of the reference implementation (fra31/auto-attack,
``autopgd_base.py``), for L-inf and L-2:

- start: ``x + eps * t / ||t||`` (``t`` uniform in [-1, 1]^d for L-inf,
  Gaussian for L-2: a point on the sphere of the ball), clipped to [0, 1];
- step ``i``: ``z = P(x_i + eta * s(grad))`` and ``x_{i+1} = P(x_i + a (z -
  x_i) + (1 - a)(x_i - x_{i-1}))``, with ``s`` the unit steepest-ascent step of
  the norm, ``a = 1`` at the first step and 0.75 after, ``P`` the projection
  onto the eps-ball within [0, 1], ``eta = 2 eps`` at the start;
- checkpoints after ``w_j`` steps, the first at ``0.22 N``, each interval
  ``0.03 N`` shorter than the last down to ``0.06 N`` (``checkpoint_lengths``);
  at each, per example, the step halves and the iterate returns to the best
  point found when the loss went up on at most ``rho`` of the interval's
  steps (the first step's "up" meaning above zero, as the official code
  compares it with a still-zero entry of its loss history), or when neither
  the step size nor the best loss changed since the previous checkpoint;
- per example the best loss and its point are tracked, and the latest
  misclassified iterate, which is the result for a fooled example.

Losses: any ``AttackLoss`` (APGD-CE, with Eq. 3's joint loss at any beta_atk),
the untargeted DLR loss on the final head ("dlr"), and the targeted DLR loss
("dlr-targeted", APGD-T: one run per target, the targets being the clean
input's 2nd, 3rd, ... highest-scoring classes). Restarts (and targets) run
one after another in a ``lax.scan``; each only matters for the examples that
no earlier run fooled, and none runs once all are fooled.

Randomised models (EOT): with ``eot_iter > 1`` the model is
``logits_fn(x, key) -> (final_logits, [probe_logits])`` with ``key`` one PRNG
key for the batch, and each gradient is the mean over ``eot_iter`` draws.

Shapes: ``x`` is (N, ...) float in [0, 1], ``y`` (N,) integer labels, ``key``
one PRNG key or (N,) per-example keys (then an example's random starts do
not depend on the rest of the batch); eps in input units. ``apgd``
compiles into one program (no host round-trip per step); ``logits_fn`` and
the config are static. ``apgd_host_loop`` runs the same steps from a Python
loop, for XLA:CPU, which runs a loop body's operations about 3x slower than
the same operations outside a loop; AutoAttack's ensemble uses it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cifs_jax.attacks.objectives import AttackLoss, LogitsFn, LossFn
from cifs_jax.attacks.objectives import as_pytree, weighted_head_loss

# pgd's helpers, shared rather than rewritten (the package re-exports the
# function ``pgd`` under the module's name, hence the names).
from cifs_jax.attacks.geometry import AUTO_UNROLL
from cifs_jax.attacks.geometry import NORMS
from cifs_jax.attacks.geometry import ascent_direction
from cifs_jax.attacks.geometry import example_keys
from cifs_jax.attacks.geometry import keep_stronger
from cifs_jax.attacks.geometry import loop_unroll
from cifs_jax.attacks.geometry import per_example_norm
from cifs_jax.attacks.geometry import project

Array = jax.Array

DLR_LOSSES = ("dlr", "dlr-targeted")
# The momentum of every step after the first (the reference's fixed 0.75).
MOMENTUM = 0.75
# The initial step size, in units of eps (the reference's, for L-inf and L-2).
INITIAL_STEP = 2.0
# Guards the DLR denominators and the start's normalisation (the reference's).
_TINY = 1e-12
# Folded into the first example's key for the model's draws (EOT).
_MODEL_DRAWS = 0x5EED


@dataclasses.dataclass(frozen=True)
class APGDConfig:
  """Settings of APGD (hashable: a static argument of ``jax.jit``).

  Attributes:
    eps: radius of the perturbation ball (input units).
    norm: "linf" or "l2".
    num_steps: gradient steps per run (the reference's ``n_iter``).
    num_restarts: runs from independent random starts (per target for APGD-T).
    loss: an ``AttackLoss`` (or "ce", the plain cross-entropy
      ``AttackLoss()``), "dlr" or "dlr-targeted".
    num_target_classes: targets of "dlr-targeted" (at most K - 1 are used).
    rho: the fraction of increasing steps below which a checkpoint halves the
      step size (the reference's ``thr_decr``).
    eot_iter: gradient draws per step; above 1 ``logits_fn`` takes a key.
    unroll: steps per iteration of the compiled loop (``lax.scan``'s
      unroll); 0 (the default) picks per backend (``loop_unroll``).
  """

  eps: float = 8 / 255
  norm: str = "linf"
  num_steps: int = 100
  num_restarts: int = 1
  loss: AttackLoss | str = "ce"
  num_target_classes: int = 9
  rho: float = 0.75
  eot_iter: int = 1
  unroll: int = AUTO_UNROLL

  def __post_init__(self):
    if self.loss == "ce":
      object.__setattr__(self, "loss", AttackLoss())
    if not (isinstance(self.loss, AttackLoss) or self.loss in DLR_LOSSES):
      raise ValueError(
        "loss must be an AttackLoss, 'ce' or one of "
        f"{DLR_LOSSES}, got {self.loss!r}."
      )
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    if self.eps < 0 or not 0 < self.rho <= 1:
      raise ValueError("eps must be >= 0 and rho in (0, 1].")
    if (
      min(
        self.num_steps,
        self.num_restarts,
        self.num_target_classes,
        self.eot_iter,
      )
      < 1
    ):
      raise ValueError(
        "num_steps, num_restarts, num_target_classes and eot_iter must be >= 1."
      )
    if self.unroll < AUTO_UNROLL:
      raise ValueError(f"unroll must be >= 0 (0: automatic), {self.unroll=}.")

  @property
  def targeted(self) -> bool:
    return self.loss == "dlr-targeted"

  @property
  def name(self) -> str:
    """The reference's name: "APGD-CE", "APGD-DLR" or "APGD-T"."""
    if self.targeted:
      return "APGD-T"
    return "APGD-DLR" if self.loss == "dlr" else "APGD-CE"


def apgd(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array,
  config: APGDConfig,
  loss_fn: LossFn | None = None,
) -> Array:
  """APGD on ``config.loss`` within the eps-ball around ``x`` and [0, 1].

  Args:
    logits_fn: x (N, ...) -> (final_logits (N, K), [probe_logits (N, K)]);
      ``(x, key)`` -> the same when ``config.eot_iter > 1``.
    x: clean inputs, (N, ...) in [0, 1].
    y: integer labels, (N,).
    key: one PRNG key or (N,) per-example keys (random starts); the EOT
      draws, one per batch, come from the first example's key.
    config: the attack's settings.
    loss_fn: (final_logits, probe_logits, y) -> (N,) loss to maximise in
      place of an ``AttackLoss`` ``config.loss`` (e.g. Eq. 3 with traced head
      weights, ``attacks.weighted_head_loss``); not with the DLR losses.

  Returns:
    (N, ...) like ``x``: for an example that some run fooled (the final head's
    top-1 differs from y) the latest misclassified iterate of the first such
    run; for an example misclassified when clean, ``x`` itself; otherwise the
    point of the highest loss over all runs.
  """
  draw = _logits_draw(logits_fn, config.eot_iter)
  loss_fn = _example_loss(config.loss, loss_fn)
  targets, start_keys, draws_key, clean_fooled = _prologue(
    draw, x, y, key, config
  )

  def one_run(best, run):
    def attack(_):
      candidate = _run(
        draw,
        loss_fn,
        x,
        y,
        targets[run],
        _fold_in_each(start_keys, run),
        jax.random.fold_in(draws_key, run),
        config,
      )
      return keep_stronger(best, candidate)

    return lax.cond(jnp.all(best[1]), lambda _: best, attack, None), None

  no_attack = (x, clean_fooled, jnp.full(y.shape, -jnp.inf))
  (x_adv, _, _), _ = lax.scan(one_run, no_attack, jnp.arange(targets.shape[0]))
  return x_adv


def apgd_host_loop(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array,
  config: APGDConfig,
  head_weights: Array | None = None,
) -> Array:
  """``apgd`` with its loops driven from Python, for XLA:CPU.

  XLA:CPU runs the operations of a loop body (``lax.scan``, however far
  unrolled) about 3x slower than the same operations outside a loop
  (jax-ml/jax#12868; a width-8 ResNet-10's input gradient at batch 224:
  about 800 vs 2,300 passes per second, ``benchmarks/README.md``). Here
  each compiled call runs ``loop_unroll(config.unroll, num_steps)`` steps
  unrolled, with no loop inside, and Python loops over the calls and the
  runs (a run is skipped once every example is fooled, as ``apgd`` does).
  The same operations as ``apgd`` in the same order (up to XLA's fusion,
  float rounding); the arguments and result are ``apgd``'s, except that
  in place of a ``loss_fn`` it takes ``head_weights`` (1 + P,): Eq. 3's
  weights of the final head and each probe (``attacks.head_weights``), with
  ``config.loss``'s kind (``attacks.weighted_head_loss``); None:
  ``config.loss`` itself. Not traceable: call it outside ``jax.jit``.
  """
  x, y, logits_fn = jnp.asarray(x), jnp.asarray(y), as_pytree(logits_fn)
  targets, start_keys, draws_key, clean_fooled = _host_prologue(
    logits_fn, config, x, y, key
  )
  segment = loop_unroll(config.unroll, config.num_steps)
  best = (x, clean_fooled, jnp.full(y.shape, -jnp.inf))
  for run in range(targets.shape[0]):
    if bool(jnp.all(best[1])):
      break
    eot_key = jax.random.fold_in(draws_key, run)
    state = _host_run_start(
      logits_fn,
      config,
      x,
      y,
      targets[run],
      eot_key,
      head_weights,
      _fold_in_each(start_keys, run),
    )
    for begin in range(0, config.num_steps, segment):
      end = min(begin + segment, config.num_steps)
      state = _host_run_steps(
        logits_fn,
        config,
        state,
        x,
        y,
        targets[run],
        eot_key,
        head_weights,
        _schedule(config.num_steps, begin, end),
      )
    best = _keep_stronger_outcome(best, state, x)
  return best[0]


def _prologue(draw, x, y, key, config):
  """(targets (R, N), start keys (N,), the model draws' key, clean_fooled
  (N,)) of an APGD call: everything before its first run."""
  start_keys = example_keys(key, x.shape[0])
  clean_key, draws_key = jax.random.split(
    jax.random.fold_in(start_keys[0], _MODEL_DRAWS)
  )
  final_logits, _ = draw(x, clean_key)
  clean_fooled = jnp.argmax(final_logits, axis=-1) != y
  return _targets(final_logits, config), start_keys, draws_key, clean_fooled


def _run_arguments(logits_fn, config, x, y, target, eot_key, head_weights):
  """The leading arguments of ``_run_start`` and ``_step_function``."""
  draw = _logits_draw(logits_fn, config.eot_iter)
  loss_fn = None
  if head_weights is not None:
    loss_fn = functools.partial(
      weighted_head_loss,
      weights=head_weights,
      kind=config.loss.kind,
      confidence=config.loss.confidence,
    )
  loss = _example_loss(config.loss, loss_fn)
  return draw, loss, x, y, target, eot_key, config


# The compiled pieces of ``apgd_host_loop`` (the config static, ``logits_fn``
# a pytree: ``as_pytree``).
@functools.partial(jax.jit, static_argnums=(1,))
def _host_prologue(logits_fn, config, x, y, key):
  return _prologue(_logits_draw(logits_fn, config.eot_iter), x, y, key, config)


@functools.partial(jax.jit, static_argnums=(1,))
def _host_run_start(
  logits_fn, config, x, y, target, eot_key, head_weights, start_keys
):
  arguments = _run_arguments(
    logits_fn, config, x, y, target, eot_key, head_weights
  )
  return _run_start(*arguments, start_keys)


@functools.partial(jax.jit, static_argnums=(1,))
def _host_run_steps(
  logits_fn, config, state, x, y, target, eot_key, head_weights, schedule
):
  arguments = _run_arguments(
    logits_fn, config, x, y, target, eot_key, head_weights
  )
  step = _step_function(*arguments)
  return lax.scan(step, state, schedule, unroll=True)[0]


@jax.jit
def _keep_stronger_outcome(best, state, x):
  return keep_stronger(best, _run_outcome(state, x))


def apgd_targeted(
  logits_fn: LogitsFn, x: Array, y: Array, key: Array, config: APGDConfig
) -> Array:
  """APGD-T: ``apgd`` on the targeted DLR loss, whatever ``config.loss``."""
  return apgd(
    logits_fn, x, y, key, dataclasses.replace(config, loss="dlr-targeted")
  )


def dlr_loss(logits: Array, y: Array) -> Array:
  """Untargeted DLR, (N,): -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3).

  ``z_pi1 >= z_pi2 >= ...`` are the sorted logits (N, K >= 3).
  """
  _check_classes(logits, 3, "dlr")
  top, top_index = lax.top_k(logits, 3)
  true_logit = _take(logits, y)
  best_other = jnp.where(top_index[:, 0] == y, top[:, 1], top[:, 0])
  return -(true_logit - best_other) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted_loss(logits: Array, y: Array, target: Array) -> Array:
  """Targeted DLR, (N,): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).

  Args:
    logits: (N, K >= 4).
    y: true labels, (N,).
    target: target classes, (N,).
  """
  _check_classes(logits, 4, "dlr-targeted")
  top, _ = lax.top_k(logits, 4)
  return -(_take(logits, y) - _take(logits, target)) / (
    top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY
  )


def checkpoint_lengths(num_steps: int) -> np.ndarray:
  """Where APGD checks its progress: (num_steps,) int.

  Entry i is the length (in steps) of the interval that ends after step i
  (0-based) when a checkpoint follows step i, else 0. The reference's integer
  form of p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
  0.06): the first interval is ``int(0.22 N)`` steps, each next one
  ``int(0.03 N)`` shorter, never under ``int(0.06 N)`` (all at least 1).
  """
  length = max(int(0.22 * num_steps), 1)
  shortest = max(int(0.06 * num_steps), 1)
  decrease = max(int(0.03 * num_steps), 1)
  lengths = np.zeros(num_steps, np.int32)
  end = length
  while end <= num_steps:
    lengths[end - 1] = length
    length = max(length - decrease, shortest)
    end += length
  return lengths


def _check_classes(logits: Array, needed: int, loss: str) -> None:
  if logits.shape[-1] < needed:
    raise ValueError(
      f"The {loss} loss needs at least {needed} classes, got "
      f"logits of shape {logits.shape}."
    )


def _take(logits: Array, index: Array) -> Array:
  """logits[n, index[n]] for each n: (N,)."""
  return jnp.take_along_axis(logits, index[:, None], axis=-1)[:, 0]


def _logits_draw(logits_fn, eot_iter):
  """``logits_fn`` as (x, key) -> logits: the key is ignored unless EOT."""
  if eot_iter > 1:
    return logits_fn
  return lambda x, key: logits_fn(x)


def _fold_in_each(keys: Array, data: int | Array) -> Array:
  """Each of the (N,) keys folded with ``data``: (N,)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def _example_loss(loss, loss_fn=None):
  """(final_logits, probe_logits, y, target) -> per-example loss (N,).

  ``loss_fn`` (final_logits, probe_logits, y) -> (N,), if given, replaces
  an ``AttackLoss``.
  """
  if loss_fn is not None:
    if not isinstance(loss, AttackLoss):
      raise ValueError(
        f"loss_fn replaces an AttackLoss config.loss, not {loss!r}."
      )
    return lambda final, probes, y, target: loss_fn(final, probes, y)
  if isinstance(loss, AttackLoss):
    return lambda final, probes, y, target: loss(final, probes, y)
  if loss == "dlr":
    return lambda final, probes, y, target: dlr_loss(final, y)
  return lambda final, probes, y, target: dlr_targeted_loss(final, y, target)


def _targets(clean_logits: Array, config: APGDConfig) -> Array:
  """The target of each run, (R, N): R = targets x restarts, targets outer.

  Untargeted losses ignore it (all -1). APGD-T's target of rank r is the
  clean input's (r + 1)-th highest-scoring class, r = 1 ... at most K - 1.
  """
  n, num_classes = clean_logits.shape
  if not config.targeted:
    return jnp.full((config.num_restarts, n), -1, jnp.int32)
  num_targets = min(config.num_target_classes, num_classes - 1)
  _, ranked = lax.top_k(clean_logits, num_targets + 1)  # (N, T + 1)
  return jnp.repeat(ranked[:, 1:].T, config.num_restarts, axis=0)


def _loss_and_grad(draw, loss_fn, x_adv, y, target, key, eot_iter):
  """Mean loss (N,) and gradient (like x) over ``eot_iter`` draws.

  Also returns the final logits (N, K) of the last draw (the reference's).
  """

  def total(x_in, draw_key):
    final, probes = draw(x_in, draw_key)
    loss = loss_fn(final, probes, y, target).astype(jnp.float32)
    return jnp.sum(loss), (loss, final)

  grad_fn = jax.grad(total, has_aux=True)
  if eot_iter == 1:
    grad, (loss, final) = grad_fn(x_adv, key)
    return loss, grad, final

  def one_draw(sums, draw_key):
    grad, (loss, final) = grad_fn(x_adv, draw_key)
    return (sums[0] + loss, sums[1] + grad), final

  zeros = (jnp.zeros(y.shape, jnp.float32), jnp.zeros_like(x_adv))
  (loss, grad), finals = lax.scan(
    one_draw, zeros, jax.random.split(key, eot_iter)
  )
  return loss / eot_iter, grad / eot_iter, finals[-1]


def _per_example(v: Array, like: Array) -> Array:
  """(N,) values shaped to broadcast against ``like`` (N, ...)."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _random_start(keys: Array, x: Array, config: APGDConfig) -> Array:
  """The reference's start: x + eps * t / ||t|| per example, in [0, 1].

  ``t`` is uniform in [-1, 1]^d (L-inf) or standard normal (L-2), drawn
  with the example's key of ``keys`` (N,); ``||.||`` is the attack's norm,
  so the start lies on the sphere of the eps-ball.
  """
  if config.norm == "linf":
    draw = lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0)
    t = jax.vmap(draw)(keys)
    size = jnp.max(jnp.abs(t), axis=tuple(range(1, x.ndim)), keepdims=True)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    size = per_example_norm(t)
  return jnp.clip(x + config.eps * t / (size + _TINY), 0.0, 1.0)


def _run(draw, loss_fn, x, y, target, start_keys, eot_key, config):
  """One APGD run: (point, fooled (N,) bool, best loss (N,)).

  ``start_keys`` (N,) draw the random starts, ``eot_key`` the model's draws.
  The point is the latest misclassified iterate where the run fooled the
  final head, else the point of the highest loss.
  """
  args = (draw, loss_fn, x, y, target, eot_key, config)
  state = _run_start(*args, start_keys)
  state, _ = lax.scan(
    _step_function(*args),
    state,
    _schedule(config.num_steps),
    unroll=loop_unroll(config.unroll, config.num_steps),
  )
  return _run_outcome(state, x)


def _schedule(num_steps: int, begin: int = 0, end: int | None = None):
  """(step indices, checkpoint interval lengths) of steps begin..end - 1."""
  end = num_steps if end is None else end
  return (
    jnp.arange(begin, end),
    jnp.asarray(checkpoint_lengths(num_steps)[begin:end]),
  )


def _run_start(draw, loss_fn, x, y, target, eot_key, config, start_keys):
  """A run's state at its random start (drawn with ``start_keys`` (N,))."""
  x_start = _random_start(start_keys, x, config)
  loss, grad, final = _loss_and_grad(
    draw,
    loss_fn,
    x_start,
    y,
    target,
    jax.random.fold_in(eot_key, 0),
    config.eot_iter,
  )
  return dict(
    x_adv=x_start,
    x_prev=x_start,
    grad=grad,
    # The loss the first step's is compared with when counting increases:
    # as the official code, whose first checkpoint compares it with a
    # still-zero entry of its loss history (loss_steps[-1]), not with the
    # starting point's loss.
    loss=jnp.zeros_like(loss),
    step_size=jnp.full(y.shape, INITIAL_STEP * config.eps, x.dtype),
    x_best=x_start,
    grad_best=grad,
    loss_best=loss,
    x_fooled=x_start,
    fooled=jnp.argmax(final, axis=-1) != y,
    increases=jnp.zeros(y.shape, jnp.int32),
    loss_best_at_check=loss,
    reduced_at_check=jnp.ones(y.shape, bool),
  )


def _step_function(draw, loss_fn, x, y, target, eot_key, config):
  """(state, (step index, checkpoint interval)) -> (state, None): one step."""

  def step(state, schedule):
    index, interval = schedule
    momentum = jnp.where(index == 0, 1.0, MOMENTUM)
    state = _ascend(state, x, momentum, config)
    loss, grad, final = _loss_and_grad(
      draw,
      loss_fn,
      state["x_adv"],
      y,
      target,
      jax.random.fold_in(eot_key, index + 1),
      config.eot_iter,
    )
    state = _record(state, loss, grad, jnp.argmax(final, axis=-1) != y)
    return _checkpoint(state, interval, config.rho), None

  return step


def _run_outcome(state, x):
  """(point, fooled, best loss) of a run's final state (see ``_run``)."""
  point = jnp.where(
    _per_example(state["fooled"], x), state["x_fooled"], state["x_best"]
  )
  return point, state["fooled"], state["loss_best"]


def _ascend(state, x, momentum, config):
  """The momentum step from ``x_adv``; moves ``x_adv`` to ``x_prev``."""
  x_adv = state["x_adv"]
  direction = ascent_direction(state["grad"], config.norm)
  z = project(
    x_adv + _per_example(state["step_size"], x) * direction, x, config
  )
  x_next = project(
    x_adv
    + momentum * (z - x_adv)
    + (1.0 - momentum) * (x_adv - state["x_prev"]),
    x,
    config,
  )
  return {**state, "x_adv": x_next, "x_prev": x_adv}


def _record(state, loss, grad, fooled_now):
  """Books the new iterate: misclassified point, increases, best loss."""
  x_adv = state["x_adv"]
  improved = loss > state["loss_best"]
  return {
    **state,
    "loss": loss,
    "grad": grad,
    "x_fooled": jnp.where(
      _per_example(fooled_now, x_adv), x_adv, state["x_fooled"]
    ),
    "fooled": state["fooled"] | fooled_now,
    "increases": state["increases"] + (loss > state["loss"]),
    "x_best": jnp.where(_per_example(improved, x_adv), x_adv, state["x_best"]),
    "grad_best": jnp.where(
      _per_example(improved, x_adv), grad, state["grad_best"]
    ),
    "loss_best": jnp.maximum(loss, state["loss_best"]),
  }


def _checkpoint(state, interval, rho):
  """At a checkpoint (``interval`` > 0 steps since the last), per example:
  halve the step and go back to the best point if progress stalled."""
  at_check = interval > 0
  oscillating = state["increases"] <= rho * interval
  stalled = ~state["reduced_at_check"] & (
    state["loss_best_at_check"] >= state["loss_best"]
  )
  reduce = at_check & (oscillating | stalled)
  back = _per_example(reduce, state["x_adv"])
  return {
    **state,
    "step_size": jnp.where(reduce, state["step_size"] / 2, state["step_size"]),
    "x_adv": jnp.where(back, state["x_best"], state["x_adv"]),
    "grad": jnp.where(back, state["grad_best"], state["grad"]),
    "increases": jnp.where(at_check, 0, state["increases"]),
    "reduced_at_check": jnp.where(at_check, reduce, state["reduced_at_check"]),
    "loss_best_at_check": jnp.where(
      at_check, state["loss_best"], state["loss_best_at_check"]
    ),
  }
