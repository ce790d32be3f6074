"""Prepares a dataset for the ``tfds`` source, once per machine (or data_dir).

Downloads the original files and writes TFDS's ArrayRecord files, which
`tfds.data_source` then reads without TensorFlow. Needs internet, and
TensorFlow plus importlib_resources (TFDS 4.9.10 encodes the images with
TensorFlow)::

  pip install -r requirements-prepare.txt
  python -m cifs_jax.data.prepare --name=cifar10 [--data_dir=DIR]

(``tfds build`` would also need apache-beam, hence this command.) Without
those packages it says what to install, or how to read the original files
instead (``data.source = "files"``, docs/data.md).
"""

from __future__ import annotations

import importlib.util
import sys

from absl import flags, logging
import tensorflow_datasets as tfds

from cifs_jax import cli
from cifs_jax.data.info import DATASETS, get_info

_NAME = flags.DEFINE_enum(
  "name", None, list(DATASETS), "Dataset to prepare.", required=True
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir",
  None,
  "TFDS data_dir, as config.data.data_dir (default: "
  "$TFDS_DATA_DIR or ~/tensorflow_datasets).",
)


# Modules TFDS needs to prepare a dataset, beyond requirements.txt.
PREPARE_MODULES = ("tensorflow", "importlib_resources")


class MissingPackagesError(ModuleNotFoundError):
  """What preparing needs is not installed; the message says what to do."""


def check_prepare_modules() -> None:
  """Raises MissingPackagesError naming each module of ``PREPARE_MODULES``
  that is not installed, what to install and the alternative."""
  missing = [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingPackagesError(
      f"Preparing a TFDS dataset needs {', '.join(missing)} (not installed): "
      "pip install -r requirements-prepare.txt "
      "(tensorflow-cpu, importlib_resources). Or prepare nothing: download "
      "the original files and train with --config.data.source=files "
      "--config.data.data_dir=DIR (docs/data.md)."
    )


def prepare(name: str, data_dir: str | None = None) -> str:
  """Downloads and prepares dataset ``name``; returns its directory.

  Raises:
    MissingPackagesError: TensorFlow or importlib_resources is missing.
  """
  check_prepare_modules()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Keep TensorFlow off the accelerators (as flax's examples do).
  tf.config.set_visible_devices([], "GPU")
  builder = tfds.builder(
    get_info(name).tfds_name, data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare()
  return str(builder.data_dir)


def main(argv):
  del argv
  try:
    directory = prepare(_NAME.value, _DATA_DIR.value)
  except MissingPackagesError as e:
    sys.exit(f"FATAL {e}")
  logging.info("Prepared %s in %s.", _NAME.value, directory)


if __name__ == "__main__":
  cli.run(main)
