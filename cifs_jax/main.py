"""Trains and evaluates a model: ``python -m cifs_jax.main --config=...``.

  python -m cifs_jax.main --config=configs/cifar_resnet18.py --workdir=DIR
  python -m cifs_jax.main --config=configs/cifar_resnet18.py:cas,fat \
      --workdir=DIR --config.train.epochs=5

Running again with the same workdir resumes from its last checkpoint.
"""

import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from cifs_jax import distributed, experiment_config
from cifs_jax.training import trainer

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

_OVERRIDE_PREFIX = "--config."


def unknown_override(argv: list[str]) -> str | None:
  """The first ``--config.<key>`` of ``argv`` whose key no config has
  (every config file builds on ``experiment_config.base_config()``)."""
  reference = experiment_config.base_config()
  for arg in argv[1:]:
    if not arg.startswith(_OVERRIDE_PREFIX):
      continue
    key = arg[len(_OVERRIDE_PREFIX) :].split("=", 1)[0]
    node = reference
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return key
      node = node[part]
  return None


def _parse_flags(argv):
  """absl's flag parsing, where an unknown ``--config.<key>`` is a usage
  error naming the whole key (ml_collections would raise a bare KeyError
  naming only its last part)."""
  key = unknown_override(argv)
  if key is not None:
    sys.stderr.write(
      f"FATAL Flags parsing error: unknown config key "
      f"config.{key} (in --config.{key}); see "
      "cifs_jax/experiment_config.py for the keys.\n"
    )
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  if jax.process_count() > 1:
    logging.info("Process %d of %d.", jax.process_index(), jax.process_count())
  logging.info("Devices: %s", jax.devices())
  trainer.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
