"""CIFAR-10, WideResNet-28-10, PGD-AT with CIFS (MLP probe hidden 240 on the
last unit of group 3, linear probe after the final BN-ReLU).

Variants as in ``cifar_resnet18.py``.
"""

from cifs_jax import experiment_config


def settings():
  """This file's config before variants."""
  config = experiment_config.base_config()
  config.model.name = "wrn28_10"
  return config


get_config = experiment_config.config_file(settings)
