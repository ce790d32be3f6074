"""Trains and evaluates a model: ``python -m cifs_jax.main --config=...``.

  python -m cifs_jax.main --config=configs/cifar_resnet18.py --workdir=DIR
  python -m cifs_jax.main --config=configs/cifar_resnet18.py:cas,fat \
      --workdir=DIR --config.train.epochs=5

Running again with the same workdir resumes from its last checkpoint.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from cifs_jax.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file(
    "config", None, "A config file of configs/, optionally with variants: "
    "configs/cifar_resnet18.py:cas,fat.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if jax.process_count() > 1:
    logging.info("Process %d of %d.", jax.process_index(),
                 jax.process_count())
  logging.info("Devices: %s", jax.devices())
  trainer.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
