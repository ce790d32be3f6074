"""Prepares a dataset for the ``tfds`` source, once per machine (or data_dir).

Downloads the original files and writes TFDS's ArrayRecord files, which
`tfds.data_source` then reads without TensorFlow. Needs internet, and
TensorFlow plus importlib_resources (TFDS 4.9.10 encodes the images with
TensorFlow)::

  pip install -r requirements-prepare.txt
  python -m cifs_jax.data.prepare --name=cifar10 [--data_dir=DIR]

(``tfds build`` would also need apache-beam, hence this command.)
"""

from __future__ import annotations

from absl import app, flags, logging
import tensorflow_datasets as tfds

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


def prepare(name: str, data_dir: str | None = None) -> str:
  """Downloads and prepares dataset ``name``; returns its directory."""
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
  logging.info(
    "Prepared %s in %s.", _NAME.value, prepare(_NAME.value, _DATA_DIR.value)
  )


if __name__ == "__main__":
  app.run(main)
