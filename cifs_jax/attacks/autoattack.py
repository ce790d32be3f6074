"""AutoAttack (Croce & Hein, ICML 2020): a sequence of attacks, worst case.

As the reference (fra31/auto-attack, ``autoattack.py``) runs it: the clean
pass first (misclassified points are not attacked), then each component in
turn on the points still robust; a point is non-robust once the final head's
top-1 at a component's output differs from its label. The ensemble checks
that itself, with the output inside the eps-ball around the clean point and
within [0, 1] (a component's own claim is never trusted), so the robust
accuracy only goes down from stage to stage.

Versions (the reference's settings, eps and norm given):

    standard   APGD-CE (1 restart), APGD-T (9 targets), FAB-T (9 targets),
               Square (5000 queries)
    rand       APGD-CE and APGD-DLR with EOT over 20 draws, for randomised
               models, which then take a key: logits_fn(x, key)
    joint      the CIFS authors' reduced AutoAttack: APGD-CE with 5 restarts
               on the joint loss of Eq. 3 (``loss``), then Square keeping
               the proposals that raise that loss (theirs), not those that
               lower the final head's margin
    custom     the components named in ``attacks``

The stages run as a cascade (``run_cascade``, shared with the evaluation
protocols): between stages the robust points are gathered on the host into
chunks of ``chunk_sizes`` (``batch_size``, then one chunk of a bucketed
size), so a shrinking robust set reuses a few compiled programs instead of
compiling one per subset size, and pads at most a quarter of a chunk.
Components are ``attack(logits_fn, x, y, key, config) -> x_adv`` with a
hashable config, looked up by name in ``COMPONENTS`` (or in the
``components`` argument). ``plan`` gives a version's components and
settings; the "autoattack" evaluation protocols build on it
(``cifs_jax.evaluation.protocols``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cifs_jax.attacks.apgd import APGDConfig, apgd, apgd_host_loop
from cifs_jax.attacks.fab import (
  FABConfig,
  fab_targeted,
  fab_targeted_host_loop,
)
from cifs_jax.attacks.square import SquareConfig, square
from cifs_jax.attacks.objectives import AttackLoss, LogitsFn, as_pytree
from cifs_jax.attacks.geometry import NORMS
from cifs_jax.attacks.geometry import per_example_norm

Array = jax.Array
# (logits_fn, x (N, ...), y (N,), key, config) -> x_adv (N, ...).
Attack = Callable[[LogitsFn, Array, Array, Array, Any], Array]

# Relative slack of the ensemble's eps-ball check (float32 rounding).
_BALL_SLACK = 1e-5


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the components of a run share.

  Attributes:
    eps: radius of the perturbation ball (input units).
    norm: "linf" or "l2".
    loss: the loss of APGD-CE (Eq. 3's joint loss at the attacker's beta).
    apgd_restarts: restarts of APGD-CE and APGD-DLR.
    eot_iter: gradient draws per APGD step (above 1 for randomised models).
    num_target_classes: targets of APGD-T and FAB-T.
    square_queries: queries of Square.
    square_on_loss: Square keeps the proposals that raise ``loss`` (else
      those that lower the final head's margin).
    unroll: APGD steps per compiled call of ``apgd_host_loop`` (the
      ensemble's APGD), or per iteration of ``apgd``'s compiled loop.
  """

  eps: float
  norm: str = "linf"
  loss: AttackLoss = AttackLoss()
  apgd_restarts: int = 1
  eot_iter: int = 1
  num_target_classes: int = 9
  square_queries: int = 5000
  square_on_loss: bool = False
  # 10 steps per compiled call: on the 2-core CPU a 100-step APGD-CE run of
  # a width-8 ResNet-10 on 224 points took 9.5 s compiled (1 step per call:
  # 30 s; 5: 11 s; 20: 10.5 s), compiling in about 9 s.
  unroll: int = 10


# A component: Settings -> (attack, its config).
Component = Callable[[Settings], tuple[Attack, Any]]


def _apgd(s: Settings, *, loss=None, **overrides):
  """APGD with the run's shared settings; ``loss`` None is the run's loss
  (APGD-CE on Eq. 3)."""
  return apgd, APGDConfig(
    eps=s.eps,
    norm=s.norm,
    loss=s.loss if loss is None else loss,
    eot_iter=s.eot_iter,
    unroll=s.unroll,
    **overrides,
  )


def _apgd_ce(s: Settings):
  return _apgd(s, num_restarts=s.apgd_restarts)


def _apgd_dlr(s: Settings):
  return _apgd(s, loss="dlr", num_restarts=s.apgd_restarts)


def _apgd_t(s: Settings):
  return _apgd(s, loss="dlr-targeted", num_target_classes=s.num_target_classes)


def _fab_t(s: Settings):
  return fab_targeted, FABConfig(
    eps=s.eps, norm=s.norm, num_target_classes=s.num_target_classes
  )


def _square(s: Settings):
  return square, SquareConfig(
    eps=s.eps,
    norm=s.norm,
    num_queries=s.square_queries,
    loss=s.loss if s.square_on_loss else None,
  )


COMPONENTS: dict[str, Component] = {
  "apgd-ce": _apgd_ce,
  "apgd-dlr": _apgd_dlr,
  "apgd-t": _apgd_t,
  "fab-t": _fab_t,
  "square": _square,
}

# version -> (components in order, Settings fields it sets).
VERSIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
  "standard": (("apgd-ce", "apgd-t", "fab-t", "square"), {}),
  "rand": (("apgd-ce", "apgd-dlr"), {"eot_iter": 20}),
  "joint": (
    ("apgd-ce", "square"),
    {"apgd_restarts": 5, "square_on_loss": True},
  ),
}


@dataclasses.dataclass(frozen=True)
class StageStats:
  """One stage of a cascade.

  Attributes:
    name: the stage (a component, or an evaluation run).
    robust_accuracy: percentage of all points still robust after it.
    attacked: points it attacked (those robust before it).
    seconds: its wall time (None: unknown, for an evaluation's run read
      back from a file that did not keep it).
  """

  name: str
  robust_accuracy: float
  attacked: int
  seconds: float | None


# A cascade stage: (name, attack) with attack(indices (n,)) -> fooled (n,).
Stage = tuple[str, Callable[[np.ndarray], np.ndarray]]


def run_cascade(
  stages: Sequence[Stage],
  robust: np.ndarray,
  log: Callable[[str], None] | None = None,
) -> list[StageStats]:
  """Runs ``stages`` in order, each only on the points still robust.

  The ensemble of ``autoattack`` and of the evaluation protocols in cascade
  mode (``cifs_jax.evaluation.evaluator``). The worst case over the stages
  (a point is robust iff no stage fools it) is the same as running every
  stage on every point, when a stage's verdict on a point does not depend
  on the other points attacked with it.

  Args:
    stages: (name, attack) pairs; ``attack(indices)`` gets the indices
      (n,) of the points still robust (n may be 0) and returns which of them
      it fooled, (n,) bool.
    robust: (N,) bool, the points robust before the first stage; updated in
      place.
    log: receives a progress line per stage (default: this module's logger).

  Returns:
    One ``StageStats`` per stage.
  """
  log = log or logging.info
  stats = []
  for name, attack in stages:
    start = time.perf_counter()
    to_attack = np.flatnonzero(robust)
    robust[to_attack[np.asarray(attack(to_attack), bool)]] = False
    stats.append(
      StageStats(
        name=name,
        robust_accuracy=100 * float(np.mean(robust)),
        attacked=len(to_attack),
        seconds=time.perf_counter() - start,
      )
    )
    log(
      f"robust accuracy after {name}: {stats[-1].robust_accuracy:.2f} % "
      f"({len(to_attack)} points attacked, {stats[-1].seconds:.1f} s)"
    )
  return stats


@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
  """The outcome of ``autoattack``.

  Attributes:
    x_adv: (N, ...): the first successful component's output for each
      non-robust point, the clean input for the rest (and for points
      misclassified when clean).
    robust: (N,) bool, the final head still right after every stage.
    accuracy: robust accuracy (percentage) after each stage, in order:
      "clean" first, then each component's name.
    stages: each component's ``StageStats`` (points attacked, seconds).
    robust_after: (N,) bool per stage, as ``accuracy``: the points robust
      after it (for point-by-point comparisons with other implementations).
  """

  x_adv: np.ndarray
  robust: np.ndarray
  accuracy: dict[str, float]
  stages: tuple[StageStats, ...] = ()
  robust_after: Mapping[str, np.ndarray] = dataclasses.field(
    default_factory=dict
  )

  @property
  def robust_accuracy(self) -> float:
    """Percentage of the points robust after every stage."""
    return 100 * float(np.mean(self.robust))


def autoattack(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  key: Array,
  *,
  eps: float,
  norm: str = "linf",
  version: str = "standard",
  attacks: Sequence[str] | None = None,
  loss: AttackLoss | None = None,
  batch_size: int = 256,
  log: Callable[[str], None] | None = None,
  components: Mapping[str, Component] | None = None,
) -> AutoAttackResult:
  """Runs AutoAttack's components in turn on the points still robust.

  Args:
    logits_fn: x (N, ...) -> (final_logits (N, K), [probe_logits (N, K)]);
      with version "rand", ``(x, key)`` -> the same (one key per batch).
    x: clean inputs, (N, ...) in [0, 1].
    y: integer labels, (N,).
    key: one PRNG key; each stage and chunk gets its own.
    eps: radius of the perturbation ball (input units).
    norm: "linf" or "l2".
    version: "standard", "rand", "joint" or "custom" (see the module doc).
    attacks: the component names of "custom" (only there).
    loss: APGD-CE's loss, an ``AttackLoss`` (required by "joint"; by
      default plain cross-entropy on the final head).
    batch_size: the most points one compiled call attacks.
    log: receives the progress lines (default: this module's logger).
    components: extra or replacement components by name.

  Returns:
    An ``AutoAttackResult`` (accuracies in percent).
  """
  names, settings = plan(version, attacks, eps=eps, norm=norm, loss=loss)
  registry = {**COMPONENTS, **(components or {})}
  unknown = [name for name in names if name not in registry]
  if unknown:
    raise ValueError(
      f"Unknown components {unknown}; known: {sorted(registry)}."
    )
  log = log or logging.info
  x, y, logits_fn = np.asarray(x), np.asarray(y), as_pytree(logits_fn)
  randomized = version == "rand"
  check = functools.partial(
    _check_chunks, logits_fn, randomized, norm, eps, batch_size
  )

  robust = ~check(x, y, x, jax.random.fold_in(key, 0), np.arange(len(y)))
  log(f"initial accuracy: {100 * np.mean(robust):.2f} %")
  x_adv = x.copy()
  robust_after = {"clean": robust.copy()}

  def stage(index, name):
    attack, config = registry[name](settings)
    stage_key, check_key = jax.random.split(jax.random.fold_in(key, index))

    def run(to_attack):
      candidates = _attack_chunks(
        _compiled(attack),
        logits_fn,
        config,
        x,
        y,
        stage_key,
        to_attack,
        batch_size,
      )
      fooled = check(
        x[to_attack],
        y[to_attack],
        candidates,
        check_key,
        np.arange(len(to_attack)),
      )
      x_adv[to_attack[fooled]] = candidates[fooled]
      robust_after[name] = robust.copy()
      robust_after[name][to_attack[fooled]] = False
      return fooled

    return name, run

  accuracy = {"clean": 100 * float(np.mean(robust))}
  stats = run_cascade(
    [stage(index, name) for index, name in enumerate(names, start=1)],
    robust,
    log,
  )
  accuracy.update((s.name, s.robust_accuracy) for s in stats)
  return AutoAttackResult(
    x_adv=x_adv,
    robust=robust,
    accuracy=accuracy,
    stages=tuple(stats),
    robust_after=robust_after,
  )


def plan(
  version: str,
  attacks: Sequence[str] | None = None,
  *,
  eps: float,
  norm: str = "linf",
  loss: AttackLoss | None = None,
) -> tuple[tuple[str, ...], Settings]:
  """(component names in order, Settings) of a version (see ``autoattack``
  for the arguments); raises ValueError on an inconsistent request."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  if version == "joint" and loss is None:
    raise ValueError("version 'joint' attacks Eq. 3's joint loss: pass loss.")
  settings = Settings(eps=eps, norm=norm, loss=loss or AttackLoss())
  if version == "custom":
    if not attacks:
      raise ValueError("version 'custom' needs the attacks to run.")
    return tuple(attacks), settings
  if attacks is not None:
    raise ValueError(
      f"version {version!r} sets its own attacks; use "
      "version='custom' to choose them."
    )
  if version not in VERSIONS:
    raise ValueError(
      f"version must be one of {sorted(VERSIONS)} or 'custom', got {version!r}."
    )
  names, fields = VERSIONS[version]
  return names, dataclasses.replace(settings, **fields)


# Attacks the ensemble replaces by an equivalent that drives its loops from
# Python, about 3x faster on XLA:CPU (``apgd_host_loop``,
# ``fab_targeted_host_loop``); so do the AutoAttack protocols of
# ``cifs_jax.evaluation`` in one process (``ComponentAttack.host_loop``).
HOST_LOOPS: dict[Attack, Attack] = {
  apgd: apgd_host_loop,
  fab_targeted: fab_targeted_host_loop,
}


def _compiled(attack: Attack) -> Attack:
  """``attack`` ready to run on host arrays: its host-driven equivalent,
  else ``_jitted``."""
  return HOST_LOOPS.get(attack) or _jitted(attack)


@functools.lru_cache(maxsize=None)
def _jitted(attack: Attack):
  """``attack`` compiled, the config static and ``logits_fn`` a pytree
  (``as_pytree``; one per attack function, so repeated runs reuse its
  compiled programs)."""
  return jax.jit(attack, static_argnums=(4,))


# The smallest compiled chunk; every chunk is a multiple of it.
MIN_CHUNK = 8


def chunk_sizes(num_points: int, batch_size: int) -> list[int]:
  """The compiled batch sizes that cover ``num_points``: (sizes, in order).

  Full ``batch_size`` chunks, then the rest as one chunk of a bucketed size:
  rounded up to a multiple of a quarter of its power of two (at least
  ``MIN_CHUNK``): 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, ...
  up to ``batch_size``. A shrinking robust set reuses at most four compiled
  sizes per doubling, each stage compiles at most one size beyond the full
  chunks (its attack's programs cost seconds each to compile), and pads at
  most a quarter of its last chunk (below 32 points, fewer than
  ``MIN_CHUNK``).
  """
  full, rest = divmod(num_points, batch_size)
  if rest == 0:
    return [batch_size] * full
  quarter = max(MIN_CHUNK, (1 << (rest.bit_length() - 1)) // 4)
  bucket = min(-(-rest // quarter) * quarter, batch_size)
  return [batch_size] * full + [bucket]


def _chunks(indices: np.ndarray, batch_size: int):
  """Yields (number of real points, padded index array) per chunk.

  Padding repeats the chunk's first index; its results are dropped.
  """
  begin = 0
  for size in chunk_sizes(len(indices), batch_size):
    chunk = indices[begin : begin + size]
    begin += size
    yield (
      len(chunk),
      np.concatenate(
        [chunk, np.full(size - len(chunk), chunk[0], chunk.dtype)]
      ),
    )


def _attack_chunks(attack, logits_fn, config, x, y, key, indices, batch_size):
  """The attack's outputs on x[indices], chunk by chunk: (len(indices), ...)."""
  outputs = [
    np.asarray(
      attack(
        logits_fn, x[padded], y[padded], jax.random.fold_in(key, chunk), config
      )
    )[:n]
    for chunk, (n, padded) in enumerate(_chunks(indices, batch_size))
  ]
  return (
    np.concatenate(outputs)
    if outputs
    else np.zeros((0,) + x.shape[1:], x.dtype)
  )


def _check_chunks(
  logits_fn, randomized, norm, eps, batch_size, x, y, x_adv, key, indices
):
  """``_fooled`` on the points at ``indices``, chunk by chunk: (n,) bool."""
  flags = [
    np.asarray(
      _fooled(
        logits_fn,
        randomized,
        norm,
        eps,
        x[padded],
        y[padded],
        x_adv[padded],
        jax.random.fold_in(key, chunk),
      )
    )[:n]
    for chunk, (n, padded) in enumerate(_chunks(indices, batch_size))
  ]
  return np.concatenate(flags) if flags else np.zeros(0, bool)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fooled(logits_fn, randomized, norm, eps, x, y, x_adv, key):
  """Whether x_adv fools the final head from inside the ball and box: (N,).

  Args:
    logits_fn, randomized: the model, and whether it takes a key.
    norm, eps: the ball around ``x`` (N, ...).
    x, y, x_adv: clean inputs, labels (N,), candidate inputs.
    key: the model's key when ``randomized``.
  """
  final_logits, _ = logits_fn(x_adv, key) if randomized else logits_fn(x_adv)
  delta = x_adv - x
  size = (
    jnp.max(jnp.abs(delta), axis=tuple(range(1, x.ndim)))
    if norm == "linf"
    else per_example_norm(delta).reshape(-1)
  )
  in_box = jnp.all((x_adv >= 0) & (x_adv <= 1), axis=tuple(range(1, x.ndim)))
  return (
    (jnp.argmax(final_logits, axis=-1) != y)
    & in_box
    & (size <= eps * (1 + _BALL_SLACK))
  )
