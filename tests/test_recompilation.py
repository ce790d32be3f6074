"""Nothing is compiled after the first batch: the training step, the
per-epoch evaluation and every attack of each evaluation protocol, with a
padded last batch (tiny ResNet-10, a few attack steps)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import data, evaluation, experiment_config, models
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax.training import step as step_lib, train_state
from tests.compilations import counted_compilations

IMAGE_SHAPE = (8, 8, 3)
NUM_EXAMPLES = 40  # batches of 16: 16, 16, then 8 padded to 16
BATCH_SIZE = 16


def tiny_config():
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "smoke"
  )
  config.model.name = "resnet10"
  config.model.width = 2
  return config


def random_split(num_examples=NUM_EXAMPLES):
  rng = np.random.default_rng(0)
  return data.Split(
    rng.integers(0, 256, (num_examples, *IMAGE_SHAPE), dtype=np.uint8),
    rng.integers(0, 10, num_examples).astype(np.int32),
    10,
  )


def compilations_per_batch(batches, run_batch):
  """Compilations while running each batch, one count per batch."""
  counts = []
  for batch in batches:
    with counted_compilations() as compilations:
      run_batch(batch)
    counts.append(len(compilations))
  return counts


def test_training_and_per_epoch_evaluation_compile_once():
  config = tiny_config()
  split = random_split()
  model = models.build_model(config.model, bn_axis_name=BATCH_AXIS)
  parallel = Parallel.create("pmap", jax.local_devices()[:2])
  train_step = parallel.compile(
    step_lib.make_train_step(
      model, config, data.augment_options(config.data), steps_per_epoch=1
    ),
    sharded_args=(False, False, True),
    donate_first=True,
  )
  eval_step = parallel.compile(
    step_lib.make_eval_step(model, config), sharded_args=(False, True)
  )
  state = parallel.replicate(
    train_state.create_train_state(
      models.build_model(config.model), IMAGE_SHAPE, config, 3
    )
  )
  device_split = parallel.replicate(split)

  def train(indices):
    nonlocal state
    state, metrics = train_step(state, device_split, parallel.shard(indices))
    jax.block_until_ready(metrics)

  index_batches = np.arange(3 * BATCH_SIZE, dtype=np.int32) % NUM_EXAMPLES
  train_counts = compilations_per_batch(
    index_batches.reshape(3, BATCH_SIZE), train
  )
  eval_counts = compilations_per_batch(
    data.eval_batches(split, BATCH_SIZE),
    lambda batch: jax.block_until_ready(
      eval_step(state, parallel.shard(batch))
    ),
  )
  assert train_counts[0] > 0 and train_counts[1:] == [0, 0]
  assert eval_counts[0] > 0 and eval_counts[1:] == [0, 0]


def few_steps(protocol, num_steps=2):
  """``protocol`` with each attack shortened to at most ``num_steps``."""
  shorten = lambda attack: dataclasses.replace(
    attack,
    config=dataclasses.replace(
      attack.config, num_steps=min(attack.config.num_steps, num_steps)
    ),
  )
  return dataclasses.replace(
    protocol, attacks=tuple(shorten(a) for a in protocol.attacks)
  )


@pytest.mark.parametrize(
  "name",
  # test_evaluation checks one compile per attack and mode on a small
  # model by default; these compile a CIFS ResNet (the strong protocol: both
  # gradient modes and restarts, twice the programs).
  [
    pytest.param("paper", marks=pytest.mark.slow),
    pytest.param("strong", marks=pytest.mark.long),
  ],
)
def test_every_attack_of_a_protocol_compiles_once(name):
  config = tiny_config()
  model = models.build_model(config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  protocol = few_steps(evaluation.PROTOCOLS[name]())
  logits_fns = {
    mode: jax.tree_util.Partial(
      functools.partial(models.with_relevance_grad(model, mode).apply),
      variables,
    )
    for mode in protocol.gradient_modes
  }

  def compilations_for(num_examples):
    """XLA compilations of a fresh evaluation of ``num_examples``."""
    jax.clear_caches()
    with counted_compilations() as compilations:
      evaluation.evaluate(
        logits_fns,
        data.eval_batches(random_split(num_examples), BATCH_SIZE),
        protocol,
        jax.random.key(1),
        progress=False,
      )
    return len(compilations)

  # One batch, then three with a padded last one: the same programs.
  one_batch = compilations_for(BATCH_SIZE)
  assert one_batch > 0
  assert compilations_for(2 * BATCH_SIZE + 3) == one_batch
