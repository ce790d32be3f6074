"""The trainer's variants and counts: ``Trainer.evaluate`` counts every test
example once, whatever the batch size, with the natural accuracy computed
here; ``shard_map`` trains the same parameters as ``pmap``; ``bf16`` trains
float32 parameters to finite values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import experiment_config, models
from cifs_jax.training import train_state
from cifs_jax.runs import trainer as trainer_lib
from tests.test_training_e2e import write_tiny_cifar10

NUM_TEST = 50  # Not a multiple of the eval batch (32) nor of 2 devices' 16.


def tiny_config(data_dir, variants="natural"):
  """The smoke variant on a ResNet-10 of width 2 and tiny CIFAR-10 files
  (64 training, ``NUM_TEST`` test examples) under ``data_dir``."""
  config = experiment_config.apply_variants(
    experiment_config.base_config(), f"smoke,{variants}"
  )
  config.model.name, config.model.width = "resnet10", 2
  config.data.source, config.data.data_dir = "files", str(data_dir)
  config.eval.batch_size = 32
  config.eval.pgd_steps = 1
  config.eval.final = False
  if not (data_dir / "cifar-10-batches-bin").exists():
    write_tiny_cifar10(data_dir, num_train=64, num_test=NUM_TEST)
  return config


def test_evaluate_counts_each_example_once_and_matches_natural_accuracy(
  tmp_path,
):
  config = tiny_config(tmp_path / "data")
  trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
  try:
    state = trainer.initial_state
    results = trainer.evaluate(trainer.parallel.replicate(state), -1)
    split = trainer.test_split
    logits, _ = jax.jit(trainer.model.apply)(
      state.variables, split.images / 255.0
    )
    natural = 100 * np.mean(np.argmax(logits, -1) == split.labels)
    assert results["eval_examples"] == NUM_TEST
    assert results["natural_accuracy"] == pytest.approx(natural)
    assert 0 <= results["pgd_accuracy"] <= 100
    assert (
      trainer.evaluate(trainer.parallel.replicate(state), 20)["eval_examples"]
      == 20
    )
  finally:
    trainer.close()


def train(config, workdir):
  """(computation dtype of the trainer's model, host parameters after
  ``config.train.epochs`` of training)."""
  trainer = trainer_lib.Trainer(config, str(workdir))
  try:
    params = trainer.parallel.unreplicate(trainer.train()).params
    return trainer.model.dtype, params
  finally:
    trainer.close()


@pytest.mark.slow
def test_shard_map_and_bf16_training_through_the_trainer(tmp_path):
  """Two PGD-AT steps: shard_map's parameters are pmap's; bf16 computes in
  bfloat16 and trains finite float32 parameters."""
  data_dir = tmp_path / "data"
  config = tiny_config(data_dir, "pgd_at")
  initial = train_state.create_train_state(
    models.build_model(config.model), (32, 32, 3), config, 2
  ).params
  runs = {
    variants: train(tiny_config(data_dir, variants), tmp_path / variants)
    for variants in ("pgd_at", "pgd_at,shard_map", "pgd_at,bf16")
  }
  (pmap_dtype, pmap), (_, shard_map), (half_dtype, half) = runs.values()
  assert pmap_dtype is None and half_dtype == jnp.bfloat16
  for params in (pmap, half):
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, initial)
    assert min(jax.tree.leaves(moved)) > 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    shard_map,
    pmap,
  )
  for leaf in jax.tree.leaves(half):
    assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))
