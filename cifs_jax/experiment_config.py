"""The experiment config: its defaults, the paper's variants, validation.

Every file in ``configs/`` defines ``settings()``, its config before any
variant (built on ``base_config()`` or on another file's ``settings()``),
and ``get_config = experiment_config.config_file(settings)``: the variants
of ``--config=file.py:cas,smoke`` (comma-separated) are applied to
``settings()``, last, so no file's own overrides can undo them. Sections:

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

import functools
import importlib.util
import math
import os
from typing import Callable

import ml_collections

from cifs_jax import data, losses, models, parallel, protocol_names
from cifs_jax.attacks.pgd import START_DISTRIBUTIONS
from cifs_jax.training import methods
from cifs_jax.validation import check_choice, check_known_keys

METHODS = tuple(methods.METHODS)

_positive = (lambda v: v > 0, "> 0")
_non_negative = (lambda v: v >= 0, ">= 0")
_finite_non_negative = (
  lambda v: 0 <= v < math.inf,
  ">= 0 and finite (inf would train the probes alone, not the final head)",
)
_count_or_all = (lambda v: v == -1 or v > 0, "-1 (all) or > 0")
# Allowed values of the numeric keys: key -> (test, description). Pixel
# values are in [0, 1] (images are scaled to [0, 1]).
RANGES = {
  "train.epochs": _positive,
  "train.batch_size": _positive,
  "train.learning_rate": _positive,
  "train.lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
  "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
  "train.weight_decay": _non_negative,
  "train.loss_beta": _finite_non_negative,
  "train.loss_scale": _positive,
  "train.max_examples": _count_or_all,
  "train.log_every_steps": _positive,
  "attack.eps": (lambda v: 0 <= v <= 1, "in [0, 1] (pixel units; 8/255)"),
  "attack.step_size": (lambda v: 0 < v <= 1, "in (0, 1] (pixel units)"),
  "attack.num_steps": _positive,
  "attack.unroll": (_non_negative[0], ">= 0 (0: chosen per backend)"),
  "fat.tau": _non_negative,
  "fat.omega": _non_negative,
  "trades.beta": _non_negative,
  "eval.every_epochs": _positive,
  "eval.num_examples": _count_or_all,
  "eval.batch_size": _positive,
  "eval.pgd_steps": _positive,
  "eval.beta_atk": _non_negative,
  "eval.final_num_examples": _count_or_all,
  "checkpoint.keep": _positive,
}


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
      # One factor per milestone instead of lr_decay at each; () : lr_decay.
      "lr_decays": (),
      "momentum": 0.9,
      "weight_decay": 2e-4,  # coupled (added to the gradient), as SGD
      # Eq. 3's beta (CAS: its beta), also of the loss PGD maximises to craft
      # the training examples.
      "loss_beta": losses.DEFAULT_BETA,
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
      "unroll": 0,  # steps per attack-loop iteration; 0: per backend
    }
  )
  config.fat = ml_collections.ConfigDict(
    {
      "tau": 0,  # FAT's tau in the first epochs (an int >= 0)
      # tau + 1 from each of these epochs on: FAT's dynamic tau.
      "tau_milestones": (50, 90),
      # Std of the N(0, 1) noise added to each early-stopped PGD step: 0 as
      # in the CIFS authors' copy of FAT (their Table 3); the official FAT
      # code's is 0.001 (variant fat_official).
      "omega": 0.0,
    }
  )
  config.trades = ml_collections.ConfigDict(
    {
      "beta": 6.0,
      # The inner maximisation's random start (with attack.random_start):
      # "normal", the official TRADES code's x + 0.001 * N(0, 1), or
      # "uniform" in the eps-ball, as PGD-AT's.
      "start": "normal",
    }
  )
  config.eval = ml_collections.ConfigDict(
    {
      "every_epochs": 1,
      "num_examples": 1000,  # test subset evaluated during training
      "batch_size": 256,
      "pgd_steps": 20,  # the reference's per-epoch PGD-20
      "beta_atk": losses.DEFAULT_BETA,  # the per-epoch PGD's joint loss
      "final": True,  # the full evaluation after training
      "rerun_final": False,  # a complete run, run again: evaluate it again
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
  """A smoke run, about a minute on a CPU, most of it compilation: a narrow
  network, 256 training examples, 1 epoch; a PGD-2 check on 64 test
  images; a final evaluation of FGSM alone (the cheapest attack, still at
  every beta_atk of the protocol) on 32."""
  config.model.width = 1 if config.model.name == "wrn28_10" else 8
  config.model.cifs.mlp_hidden = 16
  config.train.epochs = 1
  config.train.batch_size = 32
  config.train.max_examples = 256
  config.train.lr_milestones = ()
  config.train.log_every_steps = 2
  config.attack.num_steps = 2
  config.attack.unroll = 1  # tiny models: compile time dominates, rolled
  config.eval.num_examples = 64
  config.eval.batch_size = 64
  config.eval.pgd_steps = 2
  config.eval.final_attacks = ("fgsm",)
  config.eval.final_num_examples = 32


def _natural_pretrain(config):
  """The authors' natural pre-training of a CIFS model, the start of their
  adversarial training (``train.init_from``): 50 epochs at a constant
  learning rate 0.1; checkpoints ranked by natural accuracy (their log: best
  87.88 % at epoch 45)."""
  config.train.method = "natural"
  config.train.epochs = 50
  config.train.lr_milestones = ()


# The official TRADES code's PGD step per dataset (train_trades_cifar10.py:
# 0.007 at eps 0.031; train_trades_mnist.py: 0.01); SVHN takes CIFAR-10's.
TRADES_STEP_SIZES = {"cifar10": 0.007, "svhn": 0.007, "fashion_mnist": 0.01}
# The official FAT code's (FAT.py: CIFAR-10 and SVHN only).
FAT_STEP_SIZES = {"cifar10": 0.007, "svhn": 0.007}


def _trades(config):
  """TRADES with the official code's inner maximisation: the start
  ``x + 0.001 * N(0, 1)`` (``trades.start = "normal"``, the default) and its
  step size for the dataset (``TRADES_STEP_SIZES``); ``trades.start =
  "uniform"`` and ``attack.step_size`` select PGD-AT's instead."""
  config.train.method = "trades"
  config.trades.start = "normal"
  config.attack.step_size = TRADES_STEP_SIZES[config.data.name]


def _fat_official(config):
  """FAT as the official code (zjfheart/Friendly-Adversarial-Training,
  ``FAT.py``) runs it on CIFAR-10, rather than the CIFS authors' copy: noise
  omega = 0.001 at each step; the rate times 0.1 from epoch 60 (1-based),
  0.01 from 90 and 0.005 from 110 (0-based milestones 59, 89, 109); step
  0.007 on CIFAR-10 and SVHN (the official code has no Fashion-MNIST recipe:
  its step stays the config's). FAT's dynamic tau (0, then 1 after epoch
  50, 2 after 90) is the default ``fat.tau_milestones``."""
  config.train.method = "fat"
  config.fat.omega = 0.001
  config.train.lr_milestones = (59, 89, 109)
  config.train.lr_decays = (0.1, 0.1, 0.5)
  config.attack.step_size = FAT_STEP_SIZES.get(
    config.data.name, config.attack.step_size
  )


VARIANTS = {
  "cifs": lambda c: setattr(c.model, "defense", "cifs"),
  "cas": lambda c: setattr(c.model, "defense", "cas"),
  "vanilla": lambda c: setattr(c.model, "defense", "none"),
  "natural": lambda c: setattr(c.train, "method", "natural"),
  "natural_pretrain": _natural_pretrain,
  "pgd_at": lambda c: setattr(c.train, "method", "pgd_at"),
  "fat": lambda c: setattr(c.train, "method", "fat"),
  "fat_official": _fat_official,
  "trades": _trades,
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


def config_file(
  settings: Callable[[], ml_collections.ConfigDict],
) -> Callable[[str], ml_collections.ConfigDict]:
  """The ``get_config`` of a config file whose own settings are
  ``settings()``: ``get_config("cas,smoke")`` applies the variants to them,
  last (``ml_collections.config_flags`` passes the text after ``:``)."""

  def get_config(variants: str = "") -> ml_collections.ConfigDict:
    return apply_variants(settings(), variants)

  get_config.__doc__ = (
    f"``{settings.__module__}.settings()`` with the given variants applied "
    "last (comma-separated)."
  )
  return get_config


def sibling_config_file(config_path: str | os.PathLike, name: str):
  """The module of config file ``name``.py in ``config_path``'s folder,
  loaded by path, so a config file can build on another whatever the
  working directory (``from configs import ...`` works only from the
  repository root)."""
  folder = os.path.dirname(os.path.abspath(config_path))
  spec = importlib.util.spec_from_file_location(
    f"cifs_jax_config_{name}", os.path.join(folder, name + ".py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises KeyError/ValueError naming any unknown key or bad value."""
  check_known_keys(config, base_config(), "config.")
  data.validate(config.data)
  models.build_model(config.model)  # checks the model section
  check_choice("config.train.method", config.train.method, METHODS)
  check_choice("config.parallel", config.parallel, parallel.MODES)
  check_choice("config.trades.start", config.trades.start, START_DISTRIBUTIONS)
  check_choice(
    "config.eval.final_protocol",
    config.eval.final_protocol,
    tuple(protocol_names.PROTOCOL_ATTACKS),
  )
  try:
    protocol_names.check_attacks(
      config.eval.final_protocol, config.eval.final_attacks
    )
  except ValueError as e:
    raise ValueError(f"config.eval.final_attacks: {e}") from e
  for key, (in_range, allowed) in RANGES.items():
    value = _lookup(config, key)
    if not in_range(value):
      raise ValueError(f"config.{key}={value!r} must be {allowed}.")
  if math.isinf(config.eval.beta_atk) and config.model.defense != "cifs":
    # Caught here, not when the first per-epoch check is traced: vanilla has
    # no probes, and CAS's loss scale 1 + beta would be inf.
    raise ValueError(
      "config.eval.beta_atk=inf (the probes alone) needs "
      f"model.defense='cifs', got {config.model.defense!r}; use a finite "
      "beta_atk."
    )
  decays = tuple(config.train.lr_decays)
  if decays and (
    len(decays) != len(config.train.lr_milestones)
    or not all(0 < d <= 1 for d in decays)
  ):
    raise ValueError(
      f"config.train.lr_decays={decays} must be empty or one factor in "
      f"(0, 1] per milestone of train.lr_milestones "
      f"{tuple(config.train.lr_milestones)}."
    )
  for key in ("train.lr_milestones", "fat.tau_milestones"):
    epochs = list(_lookup(config, key))
    if epochs != sorted(epochs) or any(e < 0 for e in epochs):
      raise ValueError(
        f"config.{key}={tuple(epochs)} must be increasing epochs >= 0."
      )


def _lookup(config: ml_collections.ConfigDict, key: str):
  """``config["a.b"]`` as ``config.a.b``."""
  return functools.reduce(lambda node, part: node[part], key.split("."), config)
