"""The experiment config: its defaults, the paper's variants, validation.

Every file in ``configs/`` builds on ``base_config()`` and selects variants
with ``apply_variants(config, "cas,smoke")`` (the ``file.py:variant``
argument of ``--config``, comma-separated). Sections:

  seed           int; parameters, data order, augmentation and attacks
  model          see ``cifs_jax.models.default_config``
  data           see ``cifs_jax.data.default_config``
  train          the optimisation recipe and the training method
  attack         the attack that crafts training examples (PGD-AT, FAT)
  fat, trades    the options of those methods
  eval           evaluation during and after training
  checkpoint     what to keep
  parallel       "pmap" | "shard_map" (``cifs_jax.parallel``)
  half_precision bfloat16 convolutions, float32 parameters and statistics
"""

from __future__ import annotations

import ml_collections

from cifs_jax import data, losses, models, parallel
from cifs_jax.evaluation import protocols
from cifs_jax.validation import check_choice, check_known_keys

METHODS = ("natural", "pgd_at", "fat", "trades")


def base_config() -> ml_collections.ConfigDict:
  """PGD-AT of a CIFS ResNet-18 on CIFAR-10 with the reference recipe."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = models.default_config()
  config.data = data.default_config("cifar10")
  config.train = ml_collections.ConfigDict(
    {
      "method": "pgd_at",
      "epochs": 120,
      "batch_size": 128,  # global, over all devices and hosts
      "learning_rate": 0.1,
      "lr_milestones": (75, 90),  # epochs where the rate is multiplied
      "lr_decay": 0.1,
      "momentum": 0.9,
      "weight_decay": 2e-4,  # coupled (added to the gradient), as SGD
      "loss_beta": losses.DEFAULT_BETA,  # Eq. 3's beta (CAS: its beta)
      "loss_scale": losses.REFERENCE_SCALE,  # 3: the authors' loss
      "max_examples": -1,  # train on the first n examples; -1: all
      "log_every_steps": 50,
      "init_from": "",  # a workdir: start from its model weights
      "init_from_checkpoint": "best",  # of init_from: best, last or a step
    }
  )
  config.attack = ml_collections.ConfigDict(
    {
      "eps": 8 / 255,
      "step_size": 2 / 255,
      "num_steps": 10,
      "random_start": True,
      "beta": losses.DEFAULT_BETA,  # the joint loss the attacker maximises
      "unroll": 1,  # steps per iteration of the attack loop
    }
  )
  config.fat = ml_collections.ConfigDict({"tau": 0})
  config.trades = ml_collections.ConfigDict({"beta": 6.0})
  config.eval = ml_collections.ConfigDict(
    {
      "every_epochs": 1,
      "num_examples": 1000,  # test subset evaluated during training
      "batch_size": 256,
      "pgd_steps": 20,  # the reference's per-epoch PGD-20
      "final": True,  # the full evaluation after training
      "final_protocol": "paper",
      "final_attacks": (),  # subset of fgsm, pgd20, cw, pgd100
      "final_num_examples": -1,  # -1: the whole test set
    }
  )
  config.checkpoint = ml_collections.ConfigDict(
    {"keep": 3, "restore_step": -1}  # -1: resume from the latest
  )
  config.parallel = "pmap"
  config.half_precision = False
  return config


def _smoke(config):
  """Seconds on a CPU: a narrow network, a few hundred examples, 1 epoch."""
  config.model.width = 1 if config.model.name == "wrn28_10" else 8
  config.model.cifs.mlp_hidden = 16
  config.train.epochs = 1
  config.train.batch_size = 32
  config.train.max_examples = 256
  config.train.lr_milestones = ()
  config.train.log_every_steps = 2
  config.attack.num_steps = 2
  config.eval.num_examples = 64
  config.eval.batch_size = 64
  config.eval.pgd_steps = 2
  config.eval.final_attacks = ("pgd20",)
  config.eval.final_num_examples = 64


VARIANTS = {
  "cifs": lambda c: setattr(c.model, "defense", "cifs"),
  "cas": lambda c: setattr(c.model, "defense", "cas"),
  "vanilla": lambda c: setattr(c.model, "defense", "none"),
  "natural": lambda c: setattr(c.train, "method", "natural"),
  "pgd_at": lambda c: setattr(c.train, "method", "pgd_at"),
  "fat": lambda c: setattr(c.train, "method", "fat"),
  "trades": lambda c: setattr(c.train, "method", "trades"),
  "softmax": lambda c: setattr(c.model.cifs, "imgf", "softmax"),
  "sigmoid": lambda c: setattr(c.model.cifs, "imgf", "sigmoid"),
  "softplus": lambda c: setattr(c.model.cifs, "imgf", "softplus"),
  "top1": lambda c: setattr(c.model.cifs, "topk", 1),
  "top2": lambda c: setattr(c.model.cifs, "topk", 2),
  "top3": lambda c: setattr(c.model.cifs, "topk", 3),
  "bf16": lambda c: setattr(c, "half_precision", True),
  "shard_map": lambda c: setattr(c, "parallel", "shard_map"),
  "smoke": _smoke,
}


def apply_variants(
  config: ml_collections.ConfigDict, variants: str | None
) -> ml_collections.ConfigDict:
  """Applies comma-separated variants (e.g. "cas,fat,smoke") in order."""
  for variant in filter(None, (v.strip() for v in (variants or "").split(","))):
    if variant not in VARIANTS:
      raise ValueError(
        f"Unknown config variant {variant!r}; choose from "
        f"{sorted(VARIANTS)} (comma-separated)."
      )
    VARIANTS[variant](config)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises KeyError/ValueError naming any unknown key or bad value."""
  check_known_keys(config, base_config(), "config.")
  data.validate(config.data)
  models.build_model(config.model)  # checks the model section
  check_choice("config.train.method", config.train.method, METHODS)
  check_choice("config.parallel", config.parallel, parallel.MODES)
  check_choice(
    "config.eval.final_protocol",
    config.eval.final_protocol,
    tuple(protocols.PROTOCOLS),
  )
  try:
    protocols.PROTOCOLS[config.eval.final_protocol]().select(
      config.eval.final_attacks
    )
  except ValueError as e:
    raise ValueError(f"config.eval.final_attacks: {e}") from e
  positive = {
    "config.train.epochs": config.train.epochs,
    "config.train.batch_size": config.train.batch_size,
    "config.train.learning_rate": config.train.learning_rate,
    "config.train.log_every_steps": config.train.log_every_steps,
    "config.attack.num_steps": config.attack.num_steps,
    "config.attack.unroll": config.attack.unroll,
    "config.eval.every_epochs": config.eval.every_epochs,
    "config.eval.batch_size": config.eval.batch_size,
    "config.checkpoint.keep": config.checkpoint.keep,
  }
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f"{name}={value!r} must be > 0.")
  if config.attack.eps < 0 or config.attack.step_size < 0:
    raise ValueError(
      "config.attack.eps and config.attack.step_size must be >= 0."
    )
  if config.fat.tau < 0:
    raise ValueError(f"config.fat.tau={config.fat.tau!r} must be >= 0.")
  if list(config.train.lr_milestones) != sorted(config.train.lr_milestones):
    raise ValueError(
      "config.train.lr_milestones must be increasing, got "
      f"{config.train.lr_milestones}."
    )
