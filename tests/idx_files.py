"""Fashion-MNIST as IDX files: Debian's copy, and tiny synthetic ones written
in the same layout, so that code reading the files is tested everywhere."""

import gzip
import pathlib
import struct

import numpy as np
import pytest

# Where Debian's `dataset-fashion-mnist` installs the four gzipped IDX files.
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
HAS_FASHION_MNIST = (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
NO_FASHION_MNIST = (
  f"needs Debian's Fashion-MNIST in {FASHION_DIR}: "
  "apt-get install dataset-fashion-mnist"
)
needs_fashion_mnist = pytest.mark.skipif(
  not HAS_FASHION_MNIST, reason=NO_FASHION_MNIST
)


def write_idx(path, array: np.ndarray, count: int | None = None) -> None:
  """``array`` (uint8) as a gzipped IDX file; ``count`` overrides the first
  dimension its header states (to write a file shorter than it says)."""
  dims = (len(array) if count is None else count,) + array.shape[1:]
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
    f">{array.ndim}I", *dims
  )
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_tiny_fashion_mnist(
  directory: pathlib.Path, num_train: int = 64, num_test: int = 32
) -> pathlib.Path:
  """Random 28x28 images and balanced labels (example i has label i % 10)
  as the four files of Debian's layout in ``directory``; returns it."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, count in (("train", num_train), ("t10k", num_test)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return directory
