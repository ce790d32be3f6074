"""Fashion-MNIST, ResNet-10 (1-channel stem), PGD-AT with CIFS after layer3
and layer4.

Reads the original IDX files (``data.source = "files"``; Debian's
``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
eps 0.1 with step 0.01, a common Fashion-MNIST setting (the paper's
appendix with its exact values is not available to us). Variants as in
``cifar_resnet18.py``.
"""

from cifs_jax import experiment_config


def settings():
  """This file's config before variants."""
  config = experiment_config.base_config()
  config.data.name = "fashion_mnist"
  config.data.source = "files"
  config.model.name = "resnet10"
  config.attack.eps = 0.1
  config.attack.step_size = 0.01
  return config


get_config = experiment_config.config_file(settings)
