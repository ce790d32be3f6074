"""CIFAR-10, ResNet-18, PGD-AT with CIFS: the paper's headline setting.

Variants (comma-separated, e.g. ``configs/cifar_resnet18.py:cas,trades``):
cifs (default) | cas | vanilla; pgd_at (default) | natural | fat |
fat_official | trades;
softmax (default) | sigmoid | softplus; top1 | top2 (default) | top3;
natural_pretrain; bf16; shard_map; smoke (a minute on a CPU). Variants
are applied after this file's settings (``experiment_config.config_file``).
"""

from cifs_jax import experiment_config


def settings():
  """This file's config before variants."""
  return experiment_config.base_config()


get_config = experiment_config.config_file(settings)
