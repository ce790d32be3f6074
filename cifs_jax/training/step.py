"""The per-device training and evaluation steps: pure functions.

``make_train_step`` returns ``step(state, split, indices) -> (state,
metrics)``: it gathers and augments the batch on the device, crafts the
training inputs with the configured method (``methods.METHODS``; the model in
inference mode, as the reference), takes one SGD step in training mode on the
method's loss and averages gradients,
batch-norm statistics and metrics over the device axis ``BATCH_AXIS``.
Compile it with ``Parallel.compile`` (pmap or shard_map); the attack's
step loop is a ``lax.scan`` inside it, so one training step is one program.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import optax

from cifs_jax import attacks, data, losses
from cifs_jax.parallel import BATCH_AXIS
from cifs_jax.training import methods
from cifs_jax.training.train_state import TrainState

Array = jax.Array


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
  train_loss = losses.defense_loss(
    model.defense.kind, config.train.loss_beta, config.train.loss_scale
  )
  recipe = methods.METHODS[config.train.method].recipe(
    config, train_loss, steps_per_epoch
  )

  def step(state: TrainState, split: data.Split, indices: Array):
    augment_keys, attack_keys = _example_keys(state, indices)
    # The scopes name the phases in profiles (``benchmarks.profile_step``).
    with jax.named_scope("augment"):
      x = data.augment(augment_keys, split.images[indices], **augment_options)
    y = split.labels[indices]
    with jax.named_scope("attack"):
      logits_fn = lambda v: model.apply(state.variables, v, train=False)
      x_train = lax.stop_gradient(
        recipe.craft(logits_fn, x, y, attack_keys, state.step)
      )

    def objective(params):
      def forward(inputs, batch_stats):
        return model.apply(
          {"params": params, "batch_stats": batch_stats},
          inputs,
          train=True,
          labels=y,
          mutable=["batch_stats"],
        )

      return recipe.loss(forward, x, x_train, y, state.batch_stats)

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
  pgd_config = attacks.reference_pgd_config(
    config.attack.eps, config.eval.pgd_steps, config.attack.unroll
  )
  attack_loss = losses.defense_loss(model.defense.kind, config.eval.beta_atk)

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
