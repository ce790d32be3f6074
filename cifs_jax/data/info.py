"""What the pipeline knows about each dataset, and the in-memory split type."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import struct

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about one dataset.

  Attributes:
    name: the name used in ``config.data.name``.
    tfds_name: the TFDS builder that provides it.
    image_shape: (H, W, C) of one image, uint8 pixels in [0, 255].
    class_names: one name per label, label k is ``class_names[k]``.
    num_examples: examples per split of the full dataset.
    crop_padding: default zero padding (pixels) of the training random crop;
      0 disables the crop.
    flip: default for random horizontal flips in training.
    files_dir: default directory of the ``files`` source, or None.
  """

  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  num_examples: dict[str, int]
  crop_padding: int
  flip: bool
  files_dir: str | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# Augmentation defaults, as in the authors' loaders: CIFAR-10 and SVHN random
# crop (pad 4) and horizontal flip (SVHN too, although digits are not
# mirror-symmetric: `augment.flip = False` turns it off); Fashion-MNIST none
# (`transforms.ToTensor()` only).
DATASETS = {
  "cifar10": DatasetInfo(
    name="cifar10",
    tfds_name="cifar10",
    image_shape=(32, 32, 3),
    class_names=(
      "airplane",
      "automobile",
      "bird",
      "cat",
      "deer",
      "dog",
      "frog",
      "horse",
      "ship",
      "truck",
    ),
    num_examples={"train": 50_000, "test": 10_000},
    crop_padding=4,
    flip=True,
  ),
  "svhn": DatasetInfo(
    name="svhn",
    tfds_name="svhn_cropped",
    image_shape=(32, 32, 3),
    class_names=tuple(str(d) for d in range(10)),
    num_examples={"train": 73_257, "test": 26_032},
    crop_padding=4,
    flip=True,
  ),
  "fashion_mnist": DatasetInfo(
    name="fashion_mnist",
    tfds_name="fashion_mnist",
    image_shape=(28, 28, 1),
    class_names=(
      "T-shirt/top",
      "Trouser",
      "Pullover",
      "Dress",
      "Coat",
      "Sandal",
      "Shirt",
      "Sneaker",
      "Bag",
      "Ankle boot",
    ),
    num_examples={"train": 60_000, "test": 10_000},
    crop_padding=0,
    flip=False,
    files_dir="/usr/share/datasets/fashion-mnist",
  ),
}


def get_info(name: str) -> DatasetInfo:
  """The `DatasetInfo` of ``name``; ValueError listing the known names."""
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset name {name!r}; choose one of {tuple(DATASETS)}."
    )
  return DATASETS[name]


@struct.dataclass
class Split:
  """One split of a dataset, whole, in memory (a pytree).

  Attributes:
    images: uint8 (N, H, W, C), pixels in [0, 255]; a numpy array on the host
      after `load_split`, jax arrays after `Parallel.replicate` (with a leading
      device axis for pmap).
    labels: int32 (N,), in [0, num_classes).
    num_classes: K (static: not a pytree leaf).
  """

  images: Any
  labels: Any
  num_classes: int = struct.field(pytree_node=False)

  def __len__(self) -> int:
    return self.labels.shape[-1]

  def head(self, num_examples: int) -> Split:
    """The first ``num_examples`` examples (all of them if -1 or more)."""
    if num_examples < 0 or num_examples >= len(self):
      return self
    return Split(
      self.images[:num_examples], self.labels[:num_examples], self.num_classes
    )
