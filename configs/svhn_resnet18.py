"""SVHN (TFDS ``svhn_cropped``), ResNet-18, PGD-AT with CIFS.

Learning rate 0.01: PGD-AT on SVHN is commonly run with 0.01 because 0.1
tends to diverge (the paper's appendix with its exact SVHN recipe is not
available to us). Random crops and horizontal flips, as in the authors'
loader (SVHN's dataset default).
Variants as in ``cifar_resnet18.py``.
"""

from cifs_jax import experiment_config


def settings():
  """This file's config before variants."""
  config = experiment_config.base_config()
  config.data.name = "svhn"
  config.train.learning_rate = 0.01
  return config


get_config = experiment_config.config_file(settings)
