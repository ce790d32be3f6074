"""Trains and evaluates a model: ``python -m cifs_jax.main --config=...``.

  python -m cifs_jax.main --config=configs/cifar_resnet18.py --workdir=DIR
  python -m cifs_jax.main --config=configs/cifar_resnet18.py:cas,fat \
      --workdir=DIR --config.train.epochs=5

Running again with the same workdir resumes from its last checkpoint; a
complete run says so and exits (``--config.eval.rerun_final=True`` evaluates
it again). Pixel-unit keys take fractions: ``--config.attack.eps=8/255``.
User errors (flags, config values, an unusable workdir) print one line and
exit with status 2 before any data is read (``cifs_jax.cli``).
"""

from absl import flags, logging
import jax
from ml_collections import config_flags

from cifs_jax import cli, distributed, library_logs
from cifs_jax.runs import trainer

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs and results."
)
config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file of configs/, optionally with variants: "
  "configs/cifar_resnet18.py:cas,fat.",
  lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.no_positional_arguments(argv)
  cli.check_writable_directory("workdir", _WORKDIR.value)
  config = cli.validated_config(flags.FLAGS.config)
  library_logs.quiet_from_flags()
  distributed.initialize_from_flags()
  if jax.process_count() > 1:
    logging.info("Process %d of %d.", jax.process_index(), jax.process_count())
  logging.info("Devices: %s", jax.devices())
  trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
