"""White-box and score-based attacks on any ``logits_fn(x) -> (final_logits,
[probe_logits])``.

from cifs_jax import attacks
loss = attacks.AttackLoss(kind="ce", beta=2.0)          # Eq. 3, beta_atk = 2
x_adv = attacks.pgd(logits_fn, x, y, key, loss,
                    attacks.PGDConfig(eps=8 / 255, step_size=2 / 255,
                                      num_steps=20))

AutoAttack (Croce & Hein, ICML 2020) and its components, each callable alone
(``key``: one PRNG key or (N,) per-example keys):

result = attacks.autoattack(logits_fn, x, y, key, eps=8 / 255)  # standard
result.accuracy        # {"clean": ..., "apgd-ce": ..., ..., "square": ...}
x_adv = attacks.apgd(logits_fn, x, y, key, attacks.APGDConfig(eps=8 / 255))
x_adv = attacks.apgd_targeted(logits_fn, x, y, key, attacks.APGDConfig(...))
x_adv = attacks.fab_targeted(logits_fn, x, y, key, attacks.FABConfig(...))
x_adv = attacks.square(logits_fn, x, y, key, attacks.SquareConfig(...))

The functions ``pgd``, ``apgd``, ``square`` and ``autoattack`` shadow their
modules' names here: import the modules with ``importlib.import_module``
(e.g. ``"cifs_jax.attacks.apgd"``) or ``from cifs_jax.attacks.apgd import``.
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
from cifs_jax.attacks.pgd import reference_pgd_config
from cifs_jax.attacks.apgd import apgd
from cifs_jax.attacks.apgd import apgd_targeted
from cifs_jax.attacks.apgd import APGDConfig
from cifs_jax.attacks.fab import fab_targeted
from cifs_jax.attacks.fab import FABConfig
from cifs_jax.attacks.square import square
from cifs_jax.attacks.square import SquareConfig
from cifs_jax.attacks.autoattack import autoattack
from cifs_jax.attacks.autoattack import AutoAttackResult

__all__ = [
  "APGDConfig",
  "AttackLoss",
  "AutoAttackResult",
  "FABConfig",
  "LogitsFn",
  "LossFn",
  "PGDConfig",
  "SquareConfig",
  "apgd",
  "apgd_targeted",
  "autoattack",
  "fab_targeted",
  "fgsm_config",
  "friendly_pgd",
  "head_weights",
  "pgd",
  "reference_pgd_config",
  "square",
  "weighted_head_loss",
]
