"""Square's acceptance rule: the final head's margin (AutoAttack's) or a
loss such as Eq. 3's joint cross-entropy (the CIFS authors' reduced
AutoAttack), on a tiny model where the two rules pull opposite ways."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import attacks
from cifs_jax.attacks.autoattack import COMPONENTS, plan

NUM_EXAMPLES, SIDE = 16, 32
EPS = 0.25


def opposed_heads(x):
  """Two classes, label 0. The final head's margin is mean(x) - 0.35, so
  darker images fool it; the probe's cross-entropy rises with mean(x), so
  the probe-only joint loss (beta_atk = inf) prefers brighter ones."""
  brightness = jnp.mean(x, axis=(1, 2, 3))
  zeros = jnp.zeros_like(brightness)
  final = jnp.stack([brightness - 0.35, zeros], -1)
  probe = jnp.stack([zeros, 20.0 * (brightness - 0.5)], -1)
  return final, [probe]


def robust_fraction(loss=None, loss_fn=None) -> float:
  x = jnp.full((NUM_EXAMPLES, SIDE, SIDE, 1), 0.5)
  y = jnp.zeros(NUM_EXAMPLES, jnp.int32)
  config = attacks.SquareConfig(eps=EPS, num_queries=1000, loss=loss)
  x_adv = attacks.square(
    opposed_heads, x, y, jax.random.key(0), config, loss_fn=loss_fn
  )
  assert np.all(np.abs(np.asarray(x_adv - x)) <= EPS + 1e-6)
  final = opposed_heads(x_adv)[0]
  return float(np.mean(np.argmax(final, -1) == 0))


def test_the_margin_rule_darkens_and_fools_every_point():
  # The stripes start at mean 0.5 +- 0.15 (4 sigma over 32 columns): robust.
  assert robust_fraction() == 0.0


def test_the_joint_loss_rule_follows_the_joint_loss():
  """At beta_atk = inf the joint CE is the probe's: accepted proposals
  brighten the image, and the final head is never fooled."""
  probes_only = attacks.AttackLoss(kind="ce", beta=math.inf)
  assert robust_fraction(loss=probes_only) == 1.0
  # At beta_atk = 0 the joint CE is the final head's, which for two classes
  # falls with the margin: the two rules agree.
  assert robust_fraction(loss=attacks.AttackLoss(kind="ce", beta=0.0)) == 0.0


def test_loss_fn_replaces_the_configs_loss():
  """The protocols pass each beta_atk's weighted loss as ``loss_fn``."""
  probes_only = lambda final, probes, y: attacks.AttackLoss(beta=math.inf)(
    final, probes, y
  )
  final_only = attacks.AttackLoss(beta=0.0)
  assert robust_fraction(loss=final_only, loss_fn=probes_only) == 1.0


@pytest.mark.parametrize(
  "version,on_loss", [("joint", True), ("standard", False)]
)
def test_only_the_joint_version_accepts_by_the_joint_loss(version, on_loss):
  loss = attacks.AttackLoss(kind="ce", beta=2.0)
  names, settings = plan(version, eps=EPS, loss=loss)
  assert "square" in names
  _, config = COMPONENTS["square"](settings)
  assert config.loss == (loss if on_loss else None)


def test_the_joint_protocol_runs_square_at_every_beta_atk():
  """Accepting by the joint loss makes Square adaptive there: once per
  beta_atk target (gradient-free: one gradient mode); the standard
  protocol's Square runs once, on the margin."""
  from cifs_jax import evaluation

  for name, targets in (("autoattack", 1), ("autoattack-joint", 9)):
    protocol = evaluation.PROTOCOLS[name](eps=8 / 255)
    runs = evaluation.protocol_runs(protocol, num_probes=2)
    square_runs = [r for r in runs if r.attack.name == "square"]
    assert len(square_runs) == targets
    assert {r.gradient for r in square_runs} == {"stop"}
