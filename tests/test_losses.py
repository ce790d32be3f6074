"""Losses against values computed by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import losses


def ce(logits, label):
  """Cross-entropy by hand: log(sum(exp(z))) - z_y."""
  return math.log(sum(math.exp(z) for z in logits)) - logits[label]


FINAL = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
PROBE_1 = [[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]]
PROBE_2 = [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]]
LABELS = [0, 2]


def hand_joint(beta, scale):
  values = []
  for i, y in enumerate(LABELS):
    probes = (ce(PROBE_1[i], y) + ce(PROBE_2[i], y)) / 2
    if math.isinf(beta):
      values.append(scale * probes)
    else:
      values.append(
        scale * (ce(FINAL[i], y) / (1 + beta) + beta / (1 + beta) * probes)
      )
  return values


@pytest.mark.parametrize("beta", [0.0, 2.0, math.inf])
@pytest.mark.parametrize("scale", [1.0, losses.REFERENCE_SCALE])
def test_joint_loss_by_hand(beta, scale):
  probes = [jnp.array(PROBE_1), jnp.array(PROBE_2)]
  per_example = losses.joint_loss_per_example(
    jnp.array(FINAL), probes, jnp.array(LABELS), beta, scale
  )
  np.testing.assert_allclose(per_example, hand_joint(beta, scale), rtol=1e-6)


def test_reference_default_is_sum_of_three_cross_entropies():
  value = losses.joint_loss_per_example(
    jnp.array(FINAL),
    [jnp.array(PROBE_1), jnp.array(PROBE_2)],
    jnp.array(LABELS),
  )
  by_hand = np.array(
    [
      ce(FINAL[i], y) + ce(PROBE_1[i], y) + ce(PROBE_2[i], y)
      for i, y in enumerate(LABELS)
    ]
  )
  np.testing.assert_allclose(value, by_hand, rtol=1e-6)


def test_vanilla_model_gets_plain_cross_entropy():
  value = losses.joint_loss_per_example(jnp.array(FINAL), [], jnp.array(LABELS))
  np.testing.assert_allclose(
    value, [ce(FINAL[i], y) for i, y in enumerate(LABELS)], rtol=1e-6
  )
  with pytest.raises(ValueError, match="no probes"):
    losses.joint_loss_per_example(
      jnp.array(FINAL), [], jnp.array(LABELS), math.inf
    )
  with pytest.raises(ValueError, match="beta must be"):
    losses.joint_loss_per_example(jnp.array(FINAL), [], jnp.array(LABELS), -1.0)


def test_cas_loss_by_hand():
  """CAS's CE + beta * mean CE_l is the joint loss with scale 1 + beta."""
  beta = 2.0
  value = losses.joint_loss_per_example(
    jnp.array(FINAL),
    [jnp.array(PROBE_1), jnp.array(PROBE_2)],
    jnp.array(LABELS),
    beta=beta,
    scale=1 + beta,
  )
  np.testing.assert_allclose(
    value,
    [
      ce(FINAL[i], y) + (ce(PROBE_1[i], y) + ce(PROBE_2[i], y))
      for i, y in enumerate(LABELS)
    ],
    rtol=1e-6,
  )


def test_trades_kl_by_hand():
  natural, adversarial = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
  softmax = lambda z: [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
  p, q = softmax(natural), softmax(adversarial)
  by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
  value = losses.trades_kl_per_example(
    jnp.array([adversarial]), jnp.array([natural])
  )
  np.testing.assert_allclose(value, [by_hand], rtol=1e-6)
  np.testing.assert_allclose(
    losses.trades_kl_per_example(jnp.array([natural]), jnp.array([natural])),
    [0.0],
    atol=1e-7,
  )


def test_cw_margin_by_hand():
  logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [0.0, 100.0, 1.0]])
  labels = jnp.array([0, 2, 2])
  # z_y - max_other + kappa, clamped at zero, negated.
  np.testing.assert_allclose(
    losses.cw_margin_per_example(logits, labels, confidence=50.0),
    [-(3 - 2 + 50), -(1 - 5 + 50), -0.0],
  )
  np.testing.assert_allclose(
    losses.cw_margin_per_example(logits, labels, confidence=0.0),
    [-1.0, 0.0, 0.0],
  )
