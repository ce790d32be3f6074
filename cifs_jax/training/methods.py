"""Training methods, by name (``config.train.method``; docs/design.md §5).

A ``Method`` says how a step crafts the inputs it trains on (with the model
in inference mode, as the reference), the loss it minimises on them, and
the per-epoch metric that ranks the run's checkpoints. ``step`` composes a
method with a model; nothing else branches on the method's name.

  natural  the clean images; cross-entropy (the defence's loss)
  pgd_at   PGD (``config.attack``) on the defence's loss (Madry et al.)
  fat      FAT's early-stopped PGD (Zhang et al. 2020): tau + 1 steps past
           misclassification, tau growing at ``fat.tau_milestones``,
           optional per-step noise ``fat.omega``
  trades   PGD on KL(natural || adversarial) from ``trades.start``; the
           natural loss plus ``trades.beta`` times that KL (Zhang et al.
           2019)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import ml_collections

from cifs_jax import attacks, losses

Array = jax.Array
# (logits_fn, x (N, H, W, C) in [0, 1], labels (N,), per-example keys (N,),
# global step) -> the inputs to train on, (N, H, W, C).
CraftFn = Callable[[attacks.LogitsFn, Array, Array, Array, Array], Array]
# forward(inputs, batch_stats) -> ((final logits, probe logits), updates):
# the model in training mode with the batch's labels.
ForwardFn = Callable[[Array, Any], tuple[tuple[Array, list], dict]]
# (forward, clean x, crafted x, labels, batch_stats) -> (mean loss,
# (logits for the accuracy, batch-norm updates)).
TrainLossFn = Callable[
  [ForwardFn, Array, Array, Array, Any], tuple[Array, tuple[Array, dict]]
]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method's crafting and loss for one config and defence."""

  craft: CraftFn
  loss: TrainLossFn


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method (see the module docstring).

  Attributes:
    name: the ``config.train.method`` value.
    best_metric: the per-epoch evaluation metric (a key of the trainer's
      ``evaluate``) that ranks checkpoints; higher is better.
    recipe: (config, the defence's per-example loss (N,), steps per epoch)
      -> ``Recipe``.
  """

  name: str
  best_metric: str
  recipe: Callable[[ml_collections.ConfigDict, attacks.LossFn, int], Recipe]


def attack_config(config: ml_collections.ConfigDict) -> attacks.PGDConfig:
  """The L-inf PGD that crafts training examples (``config.attack``)."""
  return attacks.PGDConfig(
    eps=config.eps,
    step_size=config.step_size,
    num_steps=config.num_steps,
    random_start=config.random_start,
    unroll=config.unroll,
  )


def fat_tau_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[[Array], Array]:
  """FAT's tau at a training step: ``fat.tau``, plus 1 from each epoch of
  ``fat.tau_milestones`` on (FAT's dynamic tau: (50, 90) gives 0 in epochs
  1-50, 1 in 51-90, 2 after).

  Returns ``tau(step)``: the global step (int scalar, may be traced) ->
  int32 tau, so that one compiled step serves every value.
  """
  milestones = jnp.asarray(config.fat.tau_milestones, jnp.int32)

  def tau(step: Array) -> Array:
    epoch = step // steps_per_epoch
    return config.fat.tau + jnp.sum(epoch >= milestones, dtype=jnp.int32)

  return tau


def _loss_on_crafted(defense_loss: attacks.LossFn) -> TrainLossFn:
  """The defence's loss on the crafted inputs."""

  def loss(forward, x, x_train, y, batch_stats):
    del x
    (logits, probes), updates = forward(x_train, batch_stats)
    return jnp.mean(defense_loss(logits, probes, y)), (logits, updates)

  return loss


def _natural(config, defense_loss, steps_per_epoch) -> Recipe:
  del config, steps_per_epoch
  craft = lambda logits_fn, x, y, keys, step: x
  return Recipe(craft, _loss_on_crafted(defense_loss))


def _pgd_at(config, defense_loss, steps_per_epoch) -> Recipe:
  del steps_per_epoch
  pgd_config = attack_config(config.attack)

  def craft(logits_fn, x, y, keys, step):
    del step
    return attacks.pgd(logits_fn, x, y, keys, defense_loss, pgd_config)

  return Recipe(craft, _loss_on_crafted(defense_loss))


def _fat(config, defense_loss, steps_per_epoch) -> Recipe:
  pgd_config = attack_config(config.attack)
  tau = fat_tau_schedule(config, steps_per_epoch)

  def craft(logits_fn, x, y, keys, step):
    return attacks.friendly_pgd(
      logits_fn,
      x,
      y,
      keys,
      defense_loss,
      pgd_config,
      tau(step),
      omega=config.fat.omega,
    )

  return Recipe(craft, _loss_on_crafted(defense_loss))


def _trades_inner_loss(final_logits, probe_logits, natural_logits):
  """TRADES' inner objective: KL(natural || adversarial) on the final head.

  ``natural_logits`` (N, K) take the place of the labels in ``attacks.pgd``.
  """
  del probe_logits
  return losses.trades_kl_per_example(final_logits, natural_logits)


def _trades(config, defense_loss, steps_per_epoch) -> Recipe:
  del steps_per_epoch
  # The inner maximisation starts from ``trades.start`` ("normal": the
  # official 0.001 * N(0, 1)).
  pgd_config = dataclasses.replace(
    attack_config(config.attack), start=config.trades.start
  )

  def craft(logits_fn, x, y, keys, step):
    del y, step
    natural_logits = lax.stop_gradient(logits_fn(x)[0])
    return attacks.pgd(
      logits_fn, x, natural_logits, keys, _trades_inner_loss, pgd_config
    )

  def loss(forward, x, x_train, y, batch_stats):
    """The natural loss plus beta * KL(natural || adversarial)."""
    (natural_logits, probes), updates = forward(x, batch_stats)
    (adversarial_logits, _), updates = forward(x_train, updates["batch_stats"])
    value = jnp.mean(
      defense_loss(natural_logits, probes, y)
      + config.trades.beta
      * losses.trades_kl_per_example(adversarial_logits, natural_logits)
    )
    return value, (natural_logits, updates)

  return Recipe(craft, loss)


METHODS = {
  method.name: method
  for method in (
    # Natural training's PGD accuracy is near zero and uninformative.
    Method("natural", "natural_accuracy", _natural),
    Method("pgd_at", "pgd_accuracy", _pgd_at),
    Method("fat", "pgd_accuracy", _fat),
    Method("trades", "pgd_accuracy", _trades),
  )
}
