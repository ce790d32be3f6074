"""CIFAR-10, ResNet-18, PGD-AT with CIFS: the paper's headline setting.

Variants (comma-separated, e.g. ``configs/cifar_resnet18.py:cas,trades``):
cifs (default) | cas | vanilla; pgd_at (default) | natural | fat | trades;
softmax (default) | sigmoid | softplus; top1 | top2 (default) | top3;
bf16; shard_map; smoke (seconds on a CPU).
"""

from cifs_jax import experiment_config


def get_config(variants: str = ""):
  config = experiment_config.base_config()
  return experiment_config.apply_variants(config, variants)
