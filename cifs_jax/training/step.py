"""The per-device training and evaluation steps: pure functions.

``make_train_step`` returns ``step(state, split, indices) -> (state,
metrics)``: it gathers and augments the batch on the device, crafts the
training inputs with the configured method (the model in inference mode, as
the reference), takes one SGD step in training mode and averages gradients,
batch-norm statistics and metrics over the device axis ``BATCH_AXIS``.
Compile it with ``Parallel.compile`` (pmap or shard_map); the attack's
step loop is a ``lax.scan`` inside it, so one training step is one program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import optax

from cifs_jax import attacks, data, losses
from cifs_jax.parallel import BATCH_AXIS
from cifs_jax.training.train_state import TrainState

Array = jax.Array


def defense_loss(
  defense_kind: str, beta: float, scale: float = losses.REFERENCE_SCALE
) -> attacks.LossFn:
  """The per-example loss of a model with this defence, (N,).

  CIFS: Eq. 3's joint loss (times ``scale``); CAS: CE + beta * mean of the
  auxiliary CEs (the joint loss with scale 1 + beta); vanilla:
  cross-entropy. The training loss is also what PGD maximises to craft the
  training examples.
  """
  if defense_kind == "cas":
    scale = 1.0 + beta
  return functools.partial(
    losses.joint_loss_per_example, beta=beta, scale=scale
  )


def _trades_inner_loss(final_logits, probe_logits, natural_logits):
  """TRADES' inner objective: KL(natural || adversarial) on the final head.

  ``natural_logits`` (N, K) take the place of the labels in ``attacks.pgd``.
  """
  del probe_logits
  return losses.trades_kl_per_example(final_logits, natural_logits)


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


def _example_keys(state: TrainState, indices: Array) -> tuple[Array, Array]:
  """Per-example (augmentation keys, attack keys), each (B,).

  Derived from the run key, the global step and each example's index in the
  dataset, so they do not depend on how the batch is split over devices.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(step_key, i)))(
    indices
  )
  return keys[:, 0], keys[:, 1]


def make_train_step(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  augment_options: dict[str, Any],
  steps_per_epoch: int,
) -> Callable[
  [TrainState, data.Split, Array], tuple[TrainState, dict[str, Array]]
]:
  """The per-device training step of ``config.train.method``.

  The returned ``step(state, split, indices)`` takes the replicated state,
  the whole training split on the device (uint8 images (N, H, W, C), int32
  labels (N,)) and this device's (B,) example indices; it returns the new
  state and the batch metrics {"loss", "accuracy" (%), "grad_norm"}
  averaged over devices. ``steps_per_epoch`` places a step in its epoch
  (FAT's tau schedule). The model must use ``bn_axis_name=BATCH_AXIS``.
  """
  method = config.train.method
  kind = model.defense.kind
  train_loss = defense_loss(
    kind, config.train.loss_beta, config.train.loss_scale
  )
  pgd_config = attack_config(config.attack)
  # TRADES' inner maximisation starts from ``trades.start`` ("normal": the
  # official 0.001 * N(0, 1)).
  trades_pgd_config = dataclasses.replace(pgd_config, start=config.trades.start)
  fat_tau = fat_tau_schedule(config, steps_per_epoch)

  def craft(state, x, y, attack_keys):
    """The inputs to train on (gradient stopped)."""
    logits_fn = lambda v: model.apply(state.variables, v, train=False)
    if method == "pgd_at":
      x = attacks.pgd(logits_fn, x, y, attack_keys, train_loss, pgd_config)
    elif method == "fat":
      x = attacks.friendly_pgd(
        logits_fn,
        x,
        y,
        attack_keys,
        train_loss,
        pgd_config,
        fat_tau(state.step),
        omega=config.fat.omega,
      )
    elif method == "trades":
      natural_logits = lax.stop_gradient(logits_fn(x)[0])
      x = attacks.pgd(
        logits_fn,
        x,
        natural_logits,
        attack_keys,
        _trades_inner_loss,
        trades_pgd_config,
      )
    return lax.stop_gradient(x)

  def step(state: TrainState, split: data.Split, indices: Array):
    augment_keys, attack_keys = _example_keys(state, indices)
    # The scopes name the phases in profiles (``benchmarks.profile_step``).
    with jax.named_scope("augment"):
      x = data.augment(augment_keys, split.images[indices], **augment_options)
    y = split.labels[indices]
    with jax.named_scope("attack"):
      x_train = craft(state, x, y, attack_keys)

    def objective(params):
      def forward(inputs, batch_stats):
        return model.apply(
          {"params": params, "batch_stats": batch_stats},
          inputs,
          train=True,
          labels=y,
          mutable=["batch_stats"],
        )

      if method != "trades":
        (logits, probes), updates = forward(x_train, state.batch_stats)
        return jnp.mean(train_loss(logits, probes, y)), (logits, updates)
      # TRADES: the natural loss plus beta * KL(natural || adversarial).
      (natural_logits, probes), updates = forward(x, state.batch_stats)
      (adversarial_logits, _), updates = forward(
        x_train, updates["batch_stats"]
      )
      loss = jnp.mean(
        train_loss(natural_logits, probes, y)
        + config.trades.beta
        * losses.trades_kl_per_example(adversarial_logits, natural_logits)
      )
      return loss, (natural_logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
      objective, has_aux=True
    )(state.params)
    grads = lax.pmean(grads, BATCH_AXIS)
    state = state.apply_gradients(
      grads=grads, batch_stats=updates["batch_stats"]
    )
    # The gradient norm is logged and, like the loss, checked to be finite
    # before any checkpoint of the updated parameters is written.
    metrics = {
      "loss": loss,
      "accuracy": 100 * jnp.mean(jnp.argmax(logits, -1) == y),
      "grad_norm": optax.tree.norm(grads),
    }
    return state, lax.pmean(metrics, BATCH_AXIS)

  return step


def make_eval_step(
  model: nn.Module, config: ml_collections.ConfigDict
) -> Callable[[TrainState, data.Batch], dict[str, Array]]:
  """The per-device evaluation during training: natural and PGD accuracy.

  PGD is the reference's per-epoch check: ``eval.pgd_steps`` steps of size
  eps / 10 from the clean input on the joint loss at beta_atk =
  ``eval.beta_atk`` (the authors check at 2, whatever the training beta).
  Returns
  counts summed over devices: {"count", "natural_correct", "pgd_correct"}
  over the valid (mask) rows of the batch.
  """
  eps = config.attack.eps
  pgd_config = attacks.PGDConfig(
    eps=eps,
    step_size=eps / 10,
    num_steps=config.eval.pgd_steps,
    random_start=False,
    unroll=config.attack.unroll,
  )
  attack_loss = defense_loss(model.defense.kind, config.eval.beta_atk)

  def step(state: TrainState, batch: data.Batch) -> dict[str, Array]:
    x, y = data.to_float(batch.images), batch.labels
    logits_fn = lambda v: model.apply(state.variables, v, train=False)
    x_adv = attacks.pgd(logits_fn, x, y, None, attack_loss, pgd_config)
    correct = lambda inputs: jnp.sum(
      (jnp.argmax(logits_fn(inputs)[0], -1) == y) & batch.mask
    )
    counts = {
      "count": jnp.sum(batch.mask),
      "natural_correct": correct(x),
      "pgd_correct": correct(x_adv),
    }
    return lax.psum(counts, BATCH_AXIS)

  return step
