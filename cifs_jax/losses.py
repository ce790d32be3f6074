"""Losses of CIFS training and of the attacks, per example.

All functions take logits of shape (N, K) (float) and integer labels of shape
(N,), and return per-example values of shape (N,); take ``jnp.mean`` for the
batch loss. ``probe_logits`` is a sequence of (N, K) arrays,
one per CIFS (or CAS) layer, in the order the model returns them.

Eq. 3 of the paper mixes the final head's cross-entropy with the probes'::

    L_beta = CE(p, y) / (1 + beta) + beta / ((1 + beta) |I|) * sum_l CE(p_l, y)

The authors' code trains with ``3 / (1 + beta) * (CE(p, y) + beta / |I| *
sum_l CE(p_l, y))``, i.e. ``3 * L_beta`` (with beta = |I| = 2: CE_final +
CE_1 + CE_2). ``REFERENCE_SCALE`` is that factor and the default ``scale``;
pass ``scale=1.0`` for Eq. 3 exactly.

CAS's loss (Bai et al., 2021), ``CE(p, y) + beta * mean_l CE(q_l, y)``, is
the same function with ``scale = 1 + beta`` (the auxiliary logits q_l in
place of the probes').
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Factor between the authors' training loss and Eq. 3 (docs/design.md §3).
REFERENCE_SCALE = 3.0
# The paper's trade-off between the final head and the probes (beta = |I| = 2).
DEFAULT_BETA = 2.0
# Confidence of the C&W-inf attack in the authors' evaluation.
DEFAULT_CW_CONFIDENCE = 50.0


def cross_entropy_per_example(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy (nats) of (N, K) logits against (N,) labels: (N,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _probe_mean_cross_entropy(
  probe_logits: Sequence[Array], labels: Array
) -> Array:
  """(1 / |I|) * sum_l CE(p_l, y), per example: (N,)."""
  terms = [cross_entropy_per_example(p, labels) for p in probe_logits]
  return sum(terms) / len(terms)


def joint_loss_per_example(
  logits: Array,
  probe_logits: Sequence[Array],
  labels: Array,
  beta: float = DEFAULT_BETA,
  scale: float = REFERENCE_SCALE,
) -> Array:
  """``scale`` times Eq. 3's L_beta, per example: (N,).

  Args:
    logits: final-head logits, (N, K).
    probe_logits: probe logits of the CIFS layers, each (N, K). Empty for a
      model without probes, in which case the loss is CE(p, y) (unscaled).
    labels: (N,) integer labels.
    beta: the trade-off of Eq. 3, >= 0; ``math.inf`` keeps only the probe
      terms (the adaptive attack's beta_atk = inf).
    scale: overall factor; ``REFERENCE_SCALE`` (default) matches the authors'
      training loss, 1.0 gives Eq. 3.
  """
  if beta < 0:
    raise ValueError(f"beta must be >= 0 (or math.inf), got {beta}.")
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape([logits, *probe_logits])
  if not probe_logits:
    if math.isinf(beta):
      raise ValueError(
        "beta = inf keeps only probe terms, but the model has "
        "no probes (probe_logits is empty)."
      )
    return cross_entropy_per_example(logits, labels)
  probe_term = _probe_mean_cross_entropy(probe_logits, labels)
  if math.isinf(beta):
    return scale * probe_term
  final_term = cross_entropy_per_example(logits, labels)
  return scale * (final_term + beta * probe_term) / (1.0 + beta)


# Each defence's training loss as a scale of Eq. 3 (vanilla has no probes,
# so any scale gives its cross-entropy): CAS's CE + beta * mean_l CE(q_l)
# is the joint loss with scale 1 + beta (Bai et al., ICLR 2021).
_DEFENSE_SCALES = {
  "none": lambda beta, scale: scale,
  "cifs": lambda beta, scale: scale,
  "cas": lambda beta, scale: 1.0 + beta,
}


def defense_loss(
  defense_kind: str, beta: float, scale: float = REFERENCE_SCALE
) -> Callable[[Array, Sequence[Array], Array], Array]:
  """The per-example training loss (N,) of a model with this defence:
  ``(final_logits, probe_logits, labels) -> (N,)``.

  CIFS: Eq. 3's joint loss times ``scale``; CAS: CE + beta times the mean
  of the auxiliary CEs; vanilla ("none"): cross-entropy. It is also what
  PGD maximises to craft the training examples.
  """
  if defense_kind not in _DEFENSE_SCALES:
    raise ValueError(
      f"Unknown defence {defense_kind!r}; one of {tuple(_DEFENSE_SCALES)}."
    )
  return functools.partial(
    joint_loss_per_example,
    beta=beta,
    scale=_DEFENSE_SCALES[defense_kind](beta, scale),
  )


def trades_kl_per_example(
  adversarial_logits: Array, natural_logits: Array
) -> Array:
  """TRADES' KL(softmax(natural) || softmax(adversarial)) per example: (N,).

  This is the inner maximisation objective and the robustness regulariser of
  TRADES (Zhang et al., 2019). The natural logits are used as given; callers
  stop their gradient where TRADES does.
  """
  natural_log_probs = jax.nn.log_softmax(natural_logits, axis=-1)
  adversarial_log_probs = jax.nn.log_softmax(adversarial_logits, axis=-1)
  return jnp.sum(
    jnp.exp(natural_log_probs) * (natural_log_probs - adversarial_log_probs),
    axis=-1,
  )


def cw_margin_per_example(
  logits: Array, labels: Array, confidence: float = DEFAULT_CW_CONFIDENCE
) -> Array:
  """C&W margin loss for an attacker to maximise, per example: (N,).

  ``-max(z_y - max_{j != y} z_j + confidence, 0)``: it rises while the true
  logit z_y leads, and saturates at 0 once another class leads by at least
  ``confidence`` (logit units), as in the C&W-inf attack of the TRADES/MART
  evaluations that the paper follows.
  """
  num_classes = logits.shape[-1]
  true_mask = jax.nn.one_hot(labels, num_classes, dtype=bool)
  true_logit = jnp.sum(jnp.where(true_mask, logits, 0.0), axis=-1)
  best_other = jnp.max(jnp.where(true_mask, -jnp.inf, logits), axis=-1)
  return -jax.nn.relu(true_logit - best_other + confidence)
