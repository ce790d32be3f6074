"""The ``tfds`` source: prepared TFDS datasets, read without TensorFlow.

`tfds.data_source` reads the ArrayRecord files that ``download_and_prepare``
wrote (PNG images, decoded by Pillow). Preparing a dataset the first time
needs TFDS's download and TensorFlow (TFDS encodes the images with
``tf.image.encode_png`` and reads the raw files with ``tf.io.gfile``): see
`cifs_jax.data.prepare`. With requirements-prepare.txt installed, `read`
prepares a missing dataset itself.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from cifs_jax.data.info import DatasetInfo

# What TFDS 4.9.10 imports only to prepare a dataset (requirements-prepare.txt).
_PREPARE_MODULES = ("tensorflow", "importlib_resources")
_CHUNK = 4096  # Examples read (and held decoded) at a time; tests lower it.


def read(info: DatasetInfo, split: str, data_dir: str | None):
  """Returns uint8 images (N, H, W, C) and int32 labels (N,) of one split."""
  try:
    source = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir)
  except ModuleNotFoundError as e:
    if e.name not in _PREPARE_MODULES:
      raise
    raise RuntimeError(
      f"TFDS dataset {info.tfds_name!r} is not prepared in data_dir="
      f"{data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}, and "
      f"preparing it needs {e.name}: `pip install -r "
      "requirements-prepare.txt`, then `python -m cifs_jax.data.prepare "
      f"--name={info.name}` (docs/data.md); or read the original files "
      "with config.data.source='files'."
    ) from e
  images = np.empty((len(source), *info.image_shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for start in range(0, len(source), _CHUNK):
    keys = list(range(start, min(start + _CHUNK, len(source))))
    # Batched reads: loading is ~2.5x faster than with one read per example.
    for i, example in zip(keys, source.__getitems__(keys), strict=True):
      if example["image"].shape != info.image_shape:
        raise ValueError(
          f"TFDS {info.tfds_name}/{split} example {i} has image shape "
          f"{example['image'].shape}, expected {info.image_shape}."
        )
      images[i] = example["image"]
      labels[i] = example["label"]
  return images, labels
