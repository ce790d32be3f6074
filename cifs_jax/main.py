"""Trains and evaluates a model: ``python -m cifs_jax.main --config=...``.

  python -m cifs_jax.main --config=configs/cifar_resnet18.py --workdir=DIR
  python -m cifs_jax.main --config=configs/cifar_resnet18.py:cas,fat \
      --workdir=DIR --config.train.epochs=5

Running again with the same workdir resumes from its last checkpoint; a
complete run says so and exits (``--config.eval.rerun_final=True`` evaluates
it again). Pixel-unit keys take fractions: ``--config.attack.eps=8/255``.
"""

import re
import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from cifs_jax import distributed, experiment_config, library_logs
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

_OVERRIDE_PREFIX = "--config."
# Keys in pixel units (images in [0, 1]), which also take a fraction N/D.
PIXEL_KEYS = ("attack.eps", "attack.step_size")
_FRACTION = re.compile(r"(\d+)/(\d+)")


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


def pixel_value(key: str, text: str) -> str:
  """The value of ``--config.<key>=<text>`` for a key of ``PIXEL_KEYS``: a
  fraction of integers "N/D" as the text of its float, anything else as it
  is (absl parses it).

  Raises:
    ValueError: naming the key, for a "/" that is not such a fraction.
  """
  if "/" not in text:
    return text
  match = _FRACTION.fullmatch(text.strip())
  if match is None or int(match[2]) == 0:
    raise ValueError(
      f"--config.{key}={text}: write a number in [0, 1] (0.0314) or a "
      "fraction of integers N/D with D > 0 (8/255)."
    )
  return repr(int(match[1]) / int(match[2]))


def rewrite_pixel_fractions(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config.attack.eps=8/255`` (or ``--config.attack.eps
  8/255``) of a ``PIXEL_KEYS`` key as its float."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    for key in PIXEL_KEYS:
      flag = _OVERRIDE_PREFIX + key
      if arg.startswith(flag + "="):
        argv[i] = f"{flag}={pixel_value(key, arg[len(flag) + 1 :])}"
      elif arg == flag and i + 1 < len(argv):
        argv[i + 1] = pixel_value(key, argv[i + 1])
  return argv


def preprocess_argv(argv: list[str]) -> list[str]:
  """The command line as absl should parse it: pixel fractions rewritten.

  Raises:
    ValueError: for an unknown ``--config.<key>`` (naming the whole key;
      ml_collections would raise a bare KeyError naming only its last part)
      or a bad pixel fraction.
  """
  key = unknown_override(argv)
  if key is not None:
    raise ValueError(
      f"unknown config key config.{key} (in --config.{key}); see "
      "cifs_jax/experiment_config.py for the keys."
    )
  return rewrite_pixel_fractions(argv)


def _parse_flags(argv):
  """absl's flag parsing of ``preprocess_argv(argv)``; its errors are usage
  errors."""
  try:
    argv = preprocess_argv(argv)
  except ValueError as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  library_logs.quiet_from_flags()
  distributed.initialize_from_flags()
  if jax.process_count() > 1:
    logging.info("Process %d of %d.", jax.process_index(), jax.process_count())
  logging.info("Devices: %s", jax.devices())
  trainer.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
