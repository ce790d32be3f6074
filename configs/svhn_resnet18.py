"""SVHN (TFDS ``svhn_cropped``), ResNet-18, PGD-AT with CIFS.

Learning rate 0.01: PGD-AT on SVHN is commonly run with 0.01 because 0.1
tends to diverge (the paper's appendix with its exact SVHN recipe is not
available to us). Crops without flips (digits).
Variants as in ``cifar_resnet18.py``.
"""

from cifs_jax import experiment_config


def get_config(variants: str = ""):
  config = experiment_config.base_config()
  config.data.name = "svhn"
  config.train.learning_rate = 0.01
  return experiment_config.apply_variants(config, variants)
