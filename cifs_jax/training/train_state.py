"""The training state and the optimiser of the reference recipe
(docs/design.md §5)."""

from __future__ import annotations

from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax


class TrainState(train_state.TrainState):
  """Flax's TrainState plus batch-norm statistics and the run's PRNG key.

  Attributes (besides ``step``, ``params``, ``opt_state``, ``tx``):
    batch_stats: running batch-norm statistics.
    rng: raw uint32 key data (2,); the key of step s is
      ``fold_in(rng, s)``, so a resumed run draws the same numbers.
  """

  batch_stats: Any = None
  rng: jax.Array = None

  @property
  def variables(self) -> dict[str, Any]:
    """The model variables, for ``model.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Piecewise-constant rate: ``learning_rate`` times ``lr_decay`` (or the
  milestone's own factor of ``lr_decays``) after each milestone epoch, as
  PyTorch's MultiStepLR stepped once per epoch.

  Update number t (0-based) uses the rate at count t and belongs to epoch
  t // steps_per_epoch; optax scales from the boundary count on.
  """
  decays = tuple(config.lr_decays) or (config.lr_decay,) * len(
    config.lr_milestones
  )
  boundaries = {
    milestone * steps_per_epoch: decay
    for milestone, decay in zip(config.lr_milestones, decays, strict=True)
  }
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (PyTorch's ``SGD``): the
  decay term ``weight_decay * w`` is added to every parameter's gradient
  before the momentum."""
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(
      learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum
    ),
  )


def create_train_state(
  model: flax.linen.Module,
  image_shape: tuple[int, ...],
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
) -> TrainState:
  """Initialises the model (seeded by ``config.seed``) and the optimiser.

  ``image_shape`` is (H, W, C) of one example.
  """
  init_key, run_key = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(model.init)(init_key, jnp.zeros((1, *image_shape)))
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    tx=make_optimizer(config.train, steps_per_epoch),
    rng=jax.random.key_data(run_key),
  )
