"""``Trainer.evaluate``: every test example counted once, whatever the batch
size, and the natural accuracy of the model as computed here."""

import jax
import numpy as np
import pytest

from cifs_jax import experiment_config
from cifs_jax.training import trainer as trainer_lib
from tests.test_training_e2e import write_tiny_cifar10

NUM_TEST = 50  # Not a multiple of the eval batch (32) nor of 2 devices' 16.


def test_evaluate_counts_each_example_once_and_matches_natural_accuracy(
  tmp_path,
):
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "smoke,natural"
  )
  config.model.name, config.model.width = "resnet10", 2
  config.data.source, config.data.data_dir = "files", str(tmp_path / "data")
  config.eval.batch_size = 32
  config.eval.pgd_steps = 1
  write_tiny_cifar10(tmp_path / "data", num_train=64, num_test=NUM_TEST)
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
