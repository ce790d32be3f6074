"""White-box attacks on any ``logits_fn(x) -> (final_logits, [probe_logits])``.

from cifs_jax import attacks
loss = attacks.AttackLoss(kind="ce", beta=2.0)          # Eq. 3, beta_atk = 2
x_adv = attacks.pgd(logits_fn, x, y, key, loss,
                    attacks.PGDConfig(eps=8 / 255, step_size=2 / 255,
                                      num_steps=20))
"""

from cifs_jax.attacks.objectives import AttackLoss
from cifs_jax.attacks.objectives import head_weights
from cifs_jax.attacks.objectives import weighted_head_loss
from cifs_jax.attacks.objectives import LogitsFn
from cifs_jax.attacks.objectives import LossFn
from cifs_jax.attacks.pgd import fgsm_config
from cifs_jax.attacks.pgd import friendly_pgd
from cifs_jax.attacks.pgd import pgd
from cifs_jax.attacks.pgd import PGDConfig

__all__ = [
  "AttackLoss",
  "LogitsFn",
  "LossFn",
  "PGDConfig",
  "fgsm_config",
  "friendly_pgd",
  "head_weights",
  "pgd",
  "weighted_head_loss",
]
