"""Trains and evaluates a model: ``python -m cifs_jax.main --config=...``.

  python -m cifs_jax.main --config=configs/cifar_resnet18.py --workdir=DIR
  python -m cifs_jax.main --config=configs/cifar_resnet18.py:cas,fat \
      --workdir=DIR --config.train.epochs=5

Running again with the same workdir resumes from its last checkpoint.
"""

import re
import sys

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


def _parse_flags(argv):
  """absl's flag parsing, where an unknown ``--config.<key>`` is a usage
  error naming the whole key (config_flags raises a bare KeyError or
  AttributeError naming only its unknown part)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    overrides = [a.split("=", 1)[0] for a in argv[1:]
                 if a.startswith("--config.")]
    if not overrides:
      raise
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # AttributeError(KeyError(message))
    message = str(error.args[0] if error.args else error)
    unknown = re.match(r"'([^']*)'", message)
    named = [o for o in overrides
             if unknown and unknown.group(1) in o[2:].split(".")]
    sys.stderr.write(
        "FATAL Flags parsing error: unknown config key in "
        f"{' or '.join(named or overrides)}: {message.replace(chr(10), ' ')}"
        "\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if jax.process_count() > 1:
    logging.info("Process %d of %d.", jax.process_index(),
                 jax.process_count())
  logging.info("Devices: %s", jax.devices())
  trainer.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
