"""The ``data`` section of a config, its defaults and its validation.

Keys (``default_config()``)::

  name: "cifar10" | "svhn" | "fashion_mnist"
  source: "tfds"   read through `tfds.data_source` (prepared ArrayRecord files)
          "files"  read the datasets' original distribution files
  data_dir: tfds: TFDS's data_dir (None: $TFDS_DATA_DIR or
            ~/tensorflow_datasets); files: the directory holding the files
            (None: only fashion_mnist has a default,
            /usr/share/datasets/fashion-mnist).
  augment:
    crop_padding: zero padding in pixels of the training random crop, 0 for
                  no crop; None: the dataset's default (`DatasetInfo`).
    flip: random horizontal flip in training; None: the dataset's default.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from cifs_jax.data.info import DATASETS, SPLITS, get_info
from cifs_jax.validation import check_choice, check_known_keys

SOURCES = ("tfds", "files")


def default_config(name: str = "cifar10") -> ml_collections.ConfigDict:
  """The ``data`` config section for dataset ``name``, read through TFDS."""
  return ml_collections.ConfigDict(
    {
      "name": name,
      "source": "tfds",
      # Typed placeholders (None by default) can be set on the command line.
      "data_dir": config_dict.placeholder(str),
      "augment": {
        "crop_padding": config_dict.placeholder(int),
        "flip": config_dict.placeholder(bool),
      },
    }
  )


def validate(config: ml_collections.ConfigDict, split: str | None = None):
  """Raises ValueError (or KeyError) for a bad ``data`` section or split.

  Every message names the key and lists the allowed values.
  """
  check_known_keys(config, default_config(), "config.data.")
  check_choice("config.data.name", config.name, tuple(DATASETS))
  check_choice("config.data.source", config.source, SOURCES)
  if config.data_dir is not None and not isinstance(config.data_dir, str):
    raise ValueError(
      f"config.data.data_dir={config.data_dir!r} must be a path (str) or None."
    )
  padding = config.augment.crop_padding
  if padding is not None and (
    isinstance(padding, bool) or not isinstance(padding, int) or padding < 0
  ):
    raise ValueError(
      f"config.data.augment.crop_padding={padding!r} must be "
      "None or an int >= 0."
    )
  flip = config.augment.flip
  if flip is not None and not isinstance(flip, bool):
    raise ValueError(
      f"config.data.augment.flip={flip!r} must be None, True or False."
    )
  if split is not None:
    check_choice("split", split, SPLITS)


def augment_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``crop_padding`` and ``flip`` for `augment`, dataset defaults filled in.

  ``config`` is a validated ``data`` section (see ``validate``).
  """
  info = get_info(config.name)
  padding, flip = config.augment.crop_padding, config.augment.flip
  return {
    "crop_padding": info.crop_padding if padding is None else padding,
    "flip": info.flip if flip is None else flip,
  }
