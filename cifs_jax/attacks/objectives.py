"""What an attacker maximises: a per-example loss on the heads Eq. 3 selects.

A model is seen only through ``logits_fn(x) -> (final_logits, probe_logits)``
with ``final_logits`` of shape (N, K) and ``probe_logits`` a sequence of (N, K)
arrays, one per CIFS (or CAS) layer; a plain classifier returns ``[]``.

``AttackLoss`` names the loss: the per-head loss ``kind`` ("ce": softmax
cross-entropy, "cw": the C&W margin with a ``confidence``) mixed over the heads
with Eq. 3's weights at the attacker's ``beta``::

    beta = 0          the final head alone
    0 < beta < inf    (l(p) + beta * mean_l l(p_l)) / (1 + beta)
    beta = inf        the probes alone: all of them (``probe=None``) or the one
                      at index ``probe`` of the probe list

The cross-entropy form is ``losses.joint_loss_per_example`` with ``scale=1``;
the C&W form applies the same weights to the margins (the authors' evaluation
does the same, up to the overall factor 1 + beta, which no sign- or
normalised-gradient attack sees).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cifs_jax import losses

Array = jax.Array
# x (N, ...) in [0, 1] -> (final_logits (N, K), [probe_logits (N, K), ...]).
LogitsFn = Callable[[Array], tuple[Array, Sequence[Array]]]
# (final_logits, probe_logits, labels) -> per-example loss (N,) to maximise.
LossFn = Callable[[Array, Sequence[Array], Array], Array]

LOSS_KINDS = ("ce", "cw")


def as_pytree(logits_fn: LogitsFn) -> jax.tree_util.Partial:
  """``logits_fn`` as a pytree that a jitted function takes as an argument.

  A ``jax.tree_util.Partial`` (e.g. ``Partial(model.apply, variables)``)
  stays as it is: its arrays are then arguments of the compiled programs,
  not constants baked into them, so one compilation serves every set of
  weights of the same model (and the programs stay small). Any other
  callable becomes ``Partial(logits_fn)``, with no arrays: compiled per
  callable, with whatever it closes over as constants.
  """
  if isinstance(logits_fn, jax.tree_util.Partial):
    return logits_fn
  return jax.tree_util.Partial(logits_fn)


@dataclasses.dataclass(frozen=True)
class AttackLoss:
  """A per-example loss to maximise; hashable, so usable as a static argument.

  Attributes:
    kind: "ce" (cross-entropy) or "cw" (C&W margin, ``confidence`` in logits).
    beta: Eq. 3's beta_atk, >= 0 or ``math.inf``; 0 attacks the final head.
    probe: with ``beta = inf``, the index of the one probe to attack; None
      attacks all probes together.
    confidence: the C&W kappa (logit units); ignored for "ce".
  """

  kind: str = "ce"
  beta: float = 0.0
  probe: int | None = None
  confidence: float = losses.DEFAULT_CW_CONFIDENCE

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}.")
    if not self.beta >= 0:
      raise ValueError(f"beta must be >= 0 or math.inf, got {self.beta}.")
    if self.probe is not None and not math.isinf(self.beta):
      raise ValueError(
        "A single probe is attacked only with beta = inf, got "
        f"beta = {self.beta} and probe = {self.probe}."
      )

  @property
  def name(self) -> str:
    """A short label, e.g. "ce/beta=2" or "cw/beta=inf/probe=1"."""
    label = f"{self.kind}/beta={self.beta:g}"
    return label if self.probe is None else f"{label}/probe={self.probe}"

  def __call__(
    self, final_logits: Array, probe_logits: Sequence[Array], labels: Array
  ) -> Array:
    """The loss of each example, (N,), from (N, K) logits and (N,) labels."""
    weights = head_weights(self.beta, self.probe, len(probe_logits))
    return weighted_head_loss(
      final_logits,
      probe_logits,
      labels,
      weights,
      kind=self.kind,
      confidence=self.confidence,
    )


def head_weights(beta: float, probe: int | None, num_probes: int) -> np.ndarray:
  """Eq. 3's weights of [final head, probe 0, ..., probe P-1]: (1 + P,).

  beta finite: 1 / (1 + beta) on the final head and beta / ((1 + beta) P)
  on each probe; beta = inf: 1 / P on each probe, or 1 on ``probe`` alone.
  A model without probes (P = 0) has the single weight 1.
  """
  if probe is not None and not 0 <= probe < num_probes:
    raise ValueError(
      f"probe={probe} is out of range: the model has {num_probes} probes."
    )
  if num_probes == 0:
    if math.isinf(beta):
      raise ValueError(
        "beta = inf attacks only the probes, but the model has "
        "none (probe_logits is empty)."
      )
    return np.ones(1, np.float32)
  if probe is not None:
    return np.eye(1 + num_probes, dtype=np.float32)[1 + probe]
  if math.isinf(beta):
    return np.array([0.0] + [1.0 / num_probes] * num_probes, np.float32)
  return np.array(
    [1.0 / (1.0 + beta)] + [beta / ((1.0 + beta) * num_probes)] * num_probes,
    np.float32,
  )


def weighted_head_loss(
  final_logits: Array,
  probe_logits: Sequence[Array],
  labels: Array,
  weights: Array,
  *,
  kind: str = "ce",
  confidence: float = losses.DEFAULT_CW_CONFIDENCE,
) -> Array:
  """sum_h weights[h] * loss(head h), per example: (N,).

  Heads are [final, probe 0, ...]; ``weights`` (1 + P,) may be traced, so
  one compiled attack serves every beta_atk (see ``head_weights``). The
  per-head loss is cross-entropy ("ce") or the C&W margin ("cw").
  """
  if kind == "ce":
    head_loss = losses.cross_entropy_per_example
  else:
    head_loss = functools.partial(
      losses.cw_margin_per_example, confidence=confidence
    )
  per_head = jnp.stack(
    [head_loss(logits, labels) for logits in (final_logits, *probe_logits)]
  )
  return jnp.asarray(weights, per_head.dtype) @ per_head
