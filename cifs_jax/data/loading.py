"""Loads a whole split into host memory as uint8 arrays, from either source."""

from __future__ import annotations

import resource
import time

from absl import logging
import ml_collections
import numpy as np

from cifs_jax.data import files_source, tfds_source
from cifs_jax.data.config import validate
from cifs_jax.data.info import Split, get_info


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
  """Loads split ``split`` ("train" | "test") of the ``data`` config section.

  Returns a `Split` of numpy arrays: images uint8 (N, H, W, C), labels int32
  (N,). Logs the load time (s), the size of the arrays (MB) and the process's
  peak resident memory (MB).
  """
  validate(config, split)
  info = get_info(config.name)
  start = time.perf_counter()
  if config.source == "tfds":
    images, labels = tfds_source.read(info, split, config.data_dir)
  else:
    data_dir = config.data_dir or info.files_dir
    if data_dir is None:
      raise ValueError(
        f"config.data.data_dir must name the directory of the "
        f"{config.name} files for source='files' (see "
        "cifs_jax.data.files_source for the file names)."
      )
    images, labels = files_source.read(config.name, split, data_dir)
  seconds = time.perf_counter() - start
  images = np.ascontiguousarray(images, np.uint8)
  if images.shape[1:] != info.image_shape or len(labels) != len(images):
    raise ValueError(
      f"{config.name}/{split}: got images {images.shape} and "
      f"{len(labels)} labels, expected (N, "
      f"{', '.join(map(str, info.image_shape))}) and N labels."
    )
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer) or (
    labels.size and (labels.min() < 0 or labels.max() >= info.num_classes)
  ):
    raise ValueError(
      f"{config.name}/{split}: labels must be integers in "
      f"[0, {info.num_classes})."
    )
  if len(images) != info.num_examples[split]:
    logging.warning(
      "%s/%s has %d examples; the full split has %d.",
      config.name,
      split,
      len(images),
      info.num_examples[split],
    )
  # ru_maxrss is in KiB on Linux.
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  logging.info(
    "Loaded %s/%s (source=%s): %d examples, %.1f MB, %.2f s; "
    "peak host memory of the process %.0f MB.",
    config.name,
    split,
    config.source,
    len(images),
    images.nbytes / 2**20,
    seconds,
    peak_mb,
  )
  return Split(
    images=images, labels=labels.astype(np.int32), num_classes=info.num_classes
  )
