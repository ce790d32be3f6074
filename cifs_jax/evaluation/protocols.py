"""The evaluation protocols: which attacks, losses and gradients
(docs/design.md §6).

A ``Protocol`` lists attacks (the columns of Table 1), the attacker's Eq. 3
trade-offs beta_atk (the adaptive evaluation), and the CIFS gradient modes to
attack with ("stop": the authors' gradient, mask constant w.r.t. the input;
"full": through the mask). Every attack runs once per (beta_atk, gradient
mode); an example is robust against an attack only if it survives all runs.

- ``paper_protocol``: the authors' settings. FGSM eps 8/255; PGD-20 and
  PGD-100 with step 0.1 * eps and no random start; C&W-inf = PGD-30 on the
  C&W margin with confidence 50 (step 0.1 * eps); the authors' gradient.
- ``strong_protocol``: PGD and C&W-inf with step eps / 4 (2/255 at
  eps = 8/255), random start and restarts; both gradient modes.
- ``autoattack_protocol``: AutoAttack's components (``ComponentAttack``),
  version "standard" (APGD-CE, APGD-T, FAB-T, Square; protocol
  "autoattack") or the CIFS authors' "joint" (APGD-CE with 5 restarts and
  Square; protocol "autoattack-joint"). APGD-CE attacks Eq. 3 at every
  beta_atk; the others read the final head only and run once per gradient
  mode (Square, gradient-free, once). The runs form a cascade
  (``Protocol.cascade``), the ensemble of ``attacks.autoattack``: each
  runs only on the points still robust, and the robust accuracy after each
  stage is the summary's cumulative worst case in protocol order.

Any protocol can run as a cascade (``as_cascade``, ``python -m
cifs_jax.evaluate --cascade``): the same per-example worst case of the final
head, at a cost that falls with robustness, but per-run tables that count
only the points each run attacked (``evaluator``).

``PROTOCOLS`` maps each name to its constructor; every caller (the
``evaluate`` command, the final evaluation of training, config validation)
picks protocols and checks attack names through it and ``Protocol.select``.

Extension point: the evaluator needs of an attack only what ``Attack`` below
states.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol as TypingProtocol, Sequence

import jax

from cifs_jax import attacks
from cifs_jax import losses
from cifs_jax.attacks.autoattack import COMPONENTS, HOST_LOOPS, plan

Array = jax.Array

GRADIENT_MODES = ("stop", "full")
# The attacker's Eq. 3 trade-offs of the paper's adaptive evaluation.
PAPER_BETAS = (0.0, 0.1, 1.0, 2.0, 10.0, 100.0, math.inf)
PAPER_EPS = 8 / 255


class Attack(TypingProtocol):
  """What the evaluator needs of an attack (hashable: a static jit argument).

  Attributes:
    name: key in the results ("fgsm", "pgd20", ...).
    label: column header ("FGSM", "PGD-20", ...).
    adaptive: whether ``head_weights`` matter: run at every (beta_atk,
      probe) target; otherwise once, on the final head (beta_atk = 0).
    gradient_based: whether the gradient mode matters: run with each;
      otherwise once, with the protocol's first.
    host_loop: None, or ``__call__``'s equivalent driven from Python, which
      the evaluator runs outside ``jax.jit`` in one process.
  """

  name: str
  label: str
  adaptive: bool
  gradient_based: bool
  host_loop: Any

  def __call__(
    self,
    logits_fn: attacks.LogitsFn,
    x: Array,
    y: Array,
    keys: Array,
    head_weights: Array,
  ) -> Array:
    """Adversarial inputs shaped like x (N, ...) for labels y (N,).

    ``keys`` are (N,) per-example PRNG keys; ``head_weights`` (1 + P,), from
    ``attacks.head_weights(beta, probe, P)``, weight the loss of the final
    head and of each probe (a traced array: one compiled attack serves
    every beta_atk).
    """

  def settings(self) -> dict[str, Any]:
    """The attack's settings, as JSON-serialisable values."""


@dataclasses.dataclass(frozen=True)
class GradientAttack:
  """An ``Attack`` that is ``attacks.pgd`` on a loss of kind ``loss_kind``."""

  name: str
  label: str
  config: attacks.PGDConfig
  loss_kind: str = "ce"
  confidence: float = losses.DEFAULT_CW_CONFIDENCE
  adaptive = True
  gradient_based = True
  host_loop = None  # the compiled loops are fast (``pgd.unrolling``)

  def __call__(self, logits_fn, x, y, keys, head_weights):
    loss = functools.partial(
      attacks.weighted_head_loss,
      weights=head_weights,
      kind=self.loss_kind,
      confidence=self.confidence,
    )
    return attacks.pgd(logits_fn, x, y, keys, loss, self.config)

  def settings(self) -> dict[str, Any]:
    settings = {"loss": self.loss_kind, **dataclasses.asdict(self.config)}
    if self.loss_kind == "cw":
      settings["confidence"] = self.confidence
    return settings


@dataclasses.dataclass(frozen=True)
class ComponentAttack:
  """An ``Attack`` that is one of AutoAttack's components.

  Attributes:
    name, label: e.g. "apgd-ce", "APGD-CE" (``autoattack.COMPONENTS``).
    attack: ``attack(logits_fn, x, y, keys, config) -> x_adv``.
    config: its settings; an ``APGDConfig`` with an ``AttackLoss`` makes the
      attack adaptive: Eq. 3 with the run's head weights replaces the loss.
  """

  name: str
  label: str
  attack: Any
  config: Any

  @property
  def adaptive(self) -> bool:
    return isinstance(getattr(self.config, "loss", None), attacks.AttackLoss)

  @property
  def gradient_based(self) -> bool:
    return self.attack is not attacks.square

  def __call__(self, logits_fn, x, y, keys, head_weights):
    if not self.adaptive:
      return self.attack(logits_fn, x, y, keys, self.config)
    loss = functools.partial(
      attacks.weighted_head_loss,
      weights=head_weights,
      kind=self.config.loss.kind,
      confidence=self.config.loss.confidence,
    )
    return self.attack(logits_fn, x, y, keys, self.config, loss_fn=loss)

  @property
  def host_loop(self):
    """``__call__``'s equivalent with its loops driven from Python (the
    ensemble's, ``autoattack.HOST_LOOPS``; about 3x faster on XLA:CPU),
    to call outside ``jax.jit``; None where the attack has none."""
    loop = HOST_LOOPS.get(self.attack)
    if loop is None:
      return None
    if self.adaptive:  # APGD-CE: Eq. 3 with the run's head weights
      return lambda logits_fn, x, y, keys, head_weights: loop(
        logits_fn, x, y, keys, self.config, head_weights
      )
    return lambda logits_fn, x, y, keys, head_weights: loop(
      logits_fn, x, y, keys, self.config
    )

  def settings(self) -> dict[str, Any]:
    settings = dataclasses.asdict(self.config)
    if self.adaptive:
      settings["loss"] = f"{self.config.loss.kind} (Eq. 3 at each beta_atk)"
    return settings


# AutoAttack's component names -> column headers.
COMPONENT_LABELS = {
  "apgd-ce": "APGD-CE",
  "apgd-dlr": "APGD-DLR",
  "apgd-t": "APGD-T",
  "fab-t": "FAB-T",
  "square": "Square",
}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A named set of attacks, attacker betas and gradient modes.

  ``cascade``: each run attacks only the examples no earlier run fooled
  (module docstring).
  """

  name: str
  attacks: tuple[Attack, ...]
  gradient_modes: tuple[str, ...]
  betas: tuple[float, ...] = PAPER_BETAS
  cascade: bool = False

  def __post_init__(self):
    unknown = set(self.gradient_modes) - set(GRADIENT_MODES)
    if unknown or not self.gradient_modes:
      raise ValueError(
        f"gradient_modes must be a non-empty subset of "
        f"{GRADIENT_MODES}, got {self.gradient_modes}."
      )
    names = [attack.name for attack in self.attacks]
    if len(set(names)) != len(names):
      raise ValueError(f"Attack names must be unique, got {names}.")

  def select(self, attack_names: Sequence[str]) -> Protocol:
    """This protocol with only ``attack_names``, in that order (all if
    empty); raises ValueError naming unknown attacks and the known ones."""
    if not attack_names:
      return self
    available = {attack.name: attack for attack in self.attacks}
    unknown = sorted(set(attack_names) - set(available))
    if unknown:
      raise ValueError(
        f"Unknown attack(s) {unknown}; the {self.name!r} "
        f"protocol has {sorted(available)}."
      )
    return dataclasses.replace(
      self, attacks=tuple(available[n] for n in attack_names)
    )

  def settings(self) -> dict[str, Any]:
    return {
      "name": self.name,
      "gradient_modes": list(self.gradient_modes),
      "betas": [beta_label(b) for b in self.betas],
      "attacks": {a.name: a.settings() for a in self.attacks},
      "cascade": self.cascade,
    }


def _table1_attacks(eps: float, pgd_config) -> tuple[Attack, ...]:
  """FGSM, PGD-20, C&W-inf (PGD-30 on the C&W margin) and PGD-100.

  ``pgd_config(num_steps=...)`` gives the PGD settings of the protocol.
  """
  return (
    GradientAttack("fgsm", "FGSM", attacks.fgsm_config(eps)),
    GradientAttack("pgd20", "PGD-20", pgd_config(num_steps=20)),
    GradientAttack("cw", "C&W-inf", pgd_config(num_steps=30), loss_kind="cw"),
    GradientAttack("pgd100", "PGD-100", pgd_config(num_steps=100)),
  )


def paper_protocol(eps: float = PAPER_EPS, unroll: int = 0) -> Protocol:
  """The authors' evaluation (the paper's Table 1 columns); ``unroll`` as
  ``PGDConfig``'s (0: per backend)."""
  pgd_config = functools.partial(
    attacks.reference_pgd_config, eps, unroll=unroll
  )
  return Protocol(
    name="paper",
    attacks=_table1_attacks(eps, pgd_config),
    gradient_modes=("stop",),
  )


def strong_protocol(
  eps: float = PAPER_EPS,
  step_size: float | None = None,
  num_restarts: int = 5,
  unroll: int = 0,
) -> Protocol:
  """Random starts, restarts and both gradient modes; ``step_size`` defaults
  to eps / 4."""
  pgd_config = functools.partial(
    attacks.PGDConfig,
    eps=eps,
    step_size=eps / 4 if step_size is None else step_size,
    random_start=True,
    num_restarts=num_restarts,
    unroll=unroll,
  )
  return Protocol(
    name="strong",
    attacks=_table1_attacks(eps, pgd_config),
    gradient_modes=GRADIENT_MODES,
  )


def autoattack_protocol(
  eps: float = PAPER_EPS,
  unroll: int = 1,
  version: str = "standard",
  **settings: Any,
) -> Protocol:
  """AutoAttack's components of ``version`` ("standard" or "joint"), L-inf.

  ``settings`` override fields of ``autoattack.Settings`` (e.g.
  ``square_queries``); both gradient modes.
  """
  names, aa_settings = plan(version, eps=eps, loss=attacks.AttackLoss())
  aa_settings = dataclasses.replace(aa_settings, unroll=unroll, **settings)
  return Protocol(
    name="autoattack" if version == "standard" else f"autoattack-{version}",
    attacks=tuple(
      ComponentAttack(
        name,
        COMPONENT_LABELS[name],
        *COMPONENTS[name](aa_settings),
      )
      for name in names
    ),
    gradient_modes=GRADIENT_MODES,
    cascade=True,
  )


# Table 1's attacks, strongest first: the order of a cascade, so that the
# cheap, weak attacks only see the few points the strong ones left.
STRONGEST_FIRST = ("pgd100", "cw", "pgd20", "fgsm")


def as_cascade(protocol: Protocol) -> Protocol:
  """``protocol`` as a cascade: its Table 1 attacks strongest first
  (``STRONGEST_FIRST``), each run only on the examples still robust. The
  final head's per-example worst case is the full protocol's; a protocol
  that is already a cascade (AutoAttack's) is returned as it is."""
  if protocol.cascade:
    return protocol
  order = {name: rank for rank, name in enumerate(STRONGEST_FIRST)}
  return dataclasses.replace(
    protocol,
    attacks=tuple(
      sorted(protocol.attacks, key=lambda a: order.get(a.name, len(order)))
    ),
    cascade=True,
  )


PROTOCOLS = {
  "paper": paper_protocol,
  "strong": strong_protocol,
  "autoattack": autoattack_protocol,
  "autoattack-joint": functools.partial(autoattack_protocol, version="joint"),
}
# The attacks of every protocol, by name (Table 1's columns first).
ATTACK_NAMES = tuple(
  dict.fromkeys(
    attack.name for make in PROTOCOLS.values() for attack in make().attacks
  )
)


def adaptive_targets(
  betas: tuple[float, ...], num_probes: int
) -> list[tuple[float, int | None]]:
  """The (beta_atk, probe) pairs to attack, each a run of every attack.

  Every beta in ``betas``, and with beta = inf also each probe alone (when
  there are several). A model without probes has one target, its final head.
  """
  if num_probes == 0:
    return [(0.0, None)]
  targets = [(beta, None) for beta in betas]
  if math.inf in betas and num_probes > 1:
    targets += [(math.inf, probe) for probe in range(num_probes)]
  return targets


def beta_label(beta: float, probe: int | None = None) -> str:
  """ "0", "0.1", "inf", "inf/probe1": the key of a target in the results."""
  label = f"{beta:g}"
  return label if probe is None else f"{label}/probe{probe}"
