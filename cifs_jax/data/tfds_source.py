"""The ``tfds`` source: prepared TFDS datasets, read without TensorFlow.

`tfds.data_source` reads the ArrayRecord files that ``download_and_prepare``
wrote (PNG images, decoded by Pillow). Preparing a dataset the first time
needs TFDS's download and TensorFlow (TFDS encodes the images with
``tf.image.encode_png`` and reads the raw files with ``tf.io.gfile``): see
`cifs_jax.data.prepare`. With requirements-prepare.txt installed, `read`
prepares a missing dataset itself, once it has checked that the dataset's
download server answers (offline, it fails at once instead of after minutes
of TFDS's retries, and removes the ``incomplete.*`` folders TFDS left).
"""

from __future__ import annotations

from importlib.util import find_spec
import os
import shutil
import socket

import numpy as np
import tensorflow_datasets as tfds

from cifs_jax.data.info import DatasetInfo

# What TFDS 4.9.10 imports only to prepare a dataset (requirements-prepare.txt).
_PREPARE_MODULES = ("tensorflow", "importlib_resources")
_CHUNK = 4096  # Examples read (and held decoded) at a time; tests lower it.
# The server each dataset's TFDS builder downloads from (its checksums.tsv).
DOWNLOAD_HOSTS = {
  "cifar10": "www.cs.toronto.edu",
  "svhn_cropped": "ufldl.stanford.edu",
  "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
}
_CONNECT_TIMEOUT_SECONDS = 5.0


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is not prepared and cannot be downloaded."""


def server_unreachable(host: str) -> str | None:
  """Why a TCP connection to ``host``:443 fails within a few seconds (the
  error's text), or None if it succeeds."""
  try:
    socket.create_connection((host, 443), _CONNECT_TIMEOUT_SECONDS).close()
  except OSError as e:
    return str(e) or type(e).__name__
  return None


def _check_download_possible(info: DatasetInfo, data_dir: str | None) -> None:
  """Raises DatasetUnavailableError, with what to do instead, when the
  dataset's download server does not answer."""
  host = DOWNLOAD_HOSTS[info.tfds_name]
  reason = server_unreachable(host)
  if reason is not None:
    raise DatasetUnavailableError(
      f"Dataset {info.name} is not prepared in data_dir="
      f"{data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'} and cannot"
      f" be downloaded: {host} does not answer ({reason}). Either download the"
      " original files on a machine that is online and pass"
      " --config.data.source=files --config.data.data_dir=DIR (docs/data.md"
      " lists them), or try the Fashion-MNIST smoke run, which needs no"
      " download: python -m cifs_jax.main"
      " --config=configs/fmnist_resnet10.py:smoke --workdir=runs/smoke"
    )


def _remove_new_incomplete_folders(dataset_dir: str, before: set[str]) -> None:
  """Removes the ``incomplete.*`` folders TFDS created in ``dataset_dir``
  (not in ``before``) while failing to prepare a dataset."""
  if not os.path.isdir(dataset_dir):
    return
  for name in set(os.listdir(dataset_dir)) - before:
    if name.startswith("incomplete."):
      shutil.rmtree(os.path.join(dataset_dir, name), ignore_errors=True)


def read(info: DatasetInfo, split: str, data_dir: str | None):
  """Returns uint8 images (N, H, W, C) and int32 labels (N,) of one split.

  Raises:
    DatasetUnavailableError: not prepared, and the server does not answer.
    RuntimeError: not prepared, and TensorFlow (needed to prepare) is
      missing.
  """
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  dataset_dir = os.path.dirname(os.fspath(builder.data_dir))
  before = set(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else set()
  try:
    # Without TensorFlow, data_source fails below with what to install.
    if not builder.is_prepared() and all(map(find_spec, _PREPARE_MODULES)):
      _check_download_possible(info, data_dir)
    source = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir)
  except ModuleNotFoundError as e:
    _remove_new_incomplete_folders(dataset_dir, before)
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
  except BaseException:
    _remove_new_incomplete_folders(dataset_dir, before)
    raise
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
