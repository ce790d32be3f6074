"""The ``files`` source: datasets from their original distribution files.

For machines without internet or TensorFlow. Each reader returns
``(images, labels)``: uint8 (N, H, W, C) and integer (N,) numpy arrays.
Expected files in the directory (``config.data.data_dir``):

- cifar10: ``cifar-10-binary.tar.gz`` (or its extracted folder
  ``cifar-10-batches-bin/``), else the python version
  ``cifar-10-python.tar.gz`` (or ``cifar-10-batches-py/``), whose pickles are
  read with `restricted_pickle` so that a tampered file cannot run code.
- svhn: ``train_32x32.mat``, ``test_32x32.mat`` (MATLAB v5, scipy.io).
- fashion_mnist: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (IDX);
  `apt-get install dataset-fashion-mnist` puts them in
  /usr/share/datasets/fashion-mnist, the default directory.

A missing file raises FileNotFoundError, a malformed one ValueError; both name
the file, what was expected and where to get it.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from typing import Callable

import numpy as np
import scipy.io

from cifs_jax.data import restricted_pickle

_WHERE = {
    "cifar10": ("download https://www.cs.toronto.edu/~kriz/"
                "cifar-10-binary.tar.gz (or cifar-10-python.tar.gz) into "
                "config.data.data_dir"),
    "svhn": ("download train_32x32.mat and test_32x32.mat from "
             "http://ufldl.stanford.edu/housenumbers/ into "
             "config.data.data_dir"),
    "fashion_mnist": ("run `apt-get install dataset-fashion-mnist` (puts "
                      "the four files in /usr/share/datasets/fashion-mnist), "
                      "or get them from https://github.com/zalandoresearch/"
                      "fashion-mnist (data/fashion/) into "
                      "config.data.data_dir"),
}


def _missing(name: str, data_dir: str, expected: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{name} (source=files): expected {expected} in {data_dir}, not found. "
      f"To get it: {_WHERE[name]}.")


def _malformed(name: str, path: str, expected: str,
               problem: str) -> ValueError:
  return ValueError(
      f"{name} (source=files): {path} is malformed ({problem}); expected "
      f"{expected}. To get a good copy: {_WHERE[name]}.")


# ---------------------------------------------------------------- CIFAR-10

_CIFAR_RECORD = 1 + 32 * 32 * 3  # label byte, then R, G, B planes of 32x32.


def _parse_cifar_binary(name: str, path: str, data: bytes):
  expected = "records of 1 label byte + 3072 pixel bytes (CIFAR-10 binary)"
  if not data or len(data) % _CIFAR_RECORD:
    raise _malformed(name, path, expected,
                     f"{len(data)} bytes is not a multiple of "
                     f"{_CIFAR_RECORD}")
  records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, records[:, 0]


def _parse_cifar_pickle(name: str, path: str, data: bytes):
  expected = ("a pickled dict with b'data' (uint8, (N, 3072)) and "
              "b'labels' (N ints) (CIFAR-10 python version)")
  try:
    batch = restricted_pickle.loads(data)
  except Exception as e:  # Any failure of the unpickler means a bad file.
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e
  pixels = batch.get(b"data") if isinstance(batch, dict) else None
  labels = batch.get(b"labels") if isinstance(batch, dict) else None
  if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8
      or pixels.ndim != 2 or pixels.shape[1] != 3072
      or not isinstance(labels, list) or len(labels) != len(pixels)):
    raise _malformed(name, path, expected, "wrong keys, types or shapes")
  images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(labels)


# (archive, its top folder = the extracted folder, train and test members,
#  parser), in order of preference.
_CIFAR_FORMATS = (
    ("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
     [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
     _parse_cifar_binary),
    ("cifar-10-python.tar.gz", "cifar-10-batches-py",
     [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
     _parse_cifar_pickle),
)


def _read_members(name: str, data_dir: str, archive: str, folder: str,
                  members: list[str]) -> dict[str, tuple[str, bytes]]:
  """Maps each member to (its path for messages, its bytes)."""
  extracted = os.path.join(data_dir, folder)
  if os.path.isdir(extracted):
    found = {}
    for member in members:
      path = os.path.join(extracted, member)
      if not os.path.isfile(path):
        raise _missing(name, data_dir, f"{folder}/{member}")
      with open(path, "rb") as f:
        found[member] = (path, f.read())
    return found
  path = os.path.join(data_dir, archive)
  wanted = {f"{folder}/{m}": m for m in members}
  found = {}
  try:
    with tarfile.open(path, "r:gz") as tar:
      for info in tar:  # One pass, in archive order: no seeking back.
        if info.name in wanted and info.isfile():
          found[wanted[info.name]] = (f"{path}:{info.name}",
                                      tar.extractfile(info).read())
  except (tarfile.TarError, EOFError, OSError) as e:
    raise _malformed(name, path, f"a gzipped tar archive with {folder}/",
                     f"{type(e).__name__}: {e}") from e
  missing = [m for m in members if m not in found]
  if missing:
    raise _malformed(name, path, f"a gzipped tar archive with {folder}/",
                     f"members {missing} are missing")
  return found


def _read_cifar10(data_dir: str, split: str):
  name = "cifar10"
  for archive, folder, train, test, parse in _CIFAR_FORMATS:
    if (os.path.isfile(os.path.join(data_dir, archive))
        or os.path.isdir(os.path.join(data_dir, folder))):
      members = train if split == "train" else test
      found = _read_members(name, data_dir, archive, folder, members)
      parts = [parse(name, *found[m]) for m in members]
      return (np.concatenate([images for images, _ in parts]),
              np.concatenate([labels for _, labels in parts]))
  raise _missing(name, data_dir, " or ".join(
      f"{archive} (or {folder}/)" for archive, folder, *_ in _CIFAR_FORMATS))


# --------------------------------------------------------------------- SVHN


def _read_svhn(data_dir: str, split: str):
  name = "svhn"
  path = os.path.join(data_dir, f"{split}_32x32.mat")
  expected = ("a MATLAB v5 file with X (uint8, (32, 32, 3, N)) and "
              "y (N labels in 1..10, 10 meaning digit 0)")
  if not os.path.isfile(path):
    raise _missing(name, data_dir, os.path.basename(path))
  try:
    mat = scipy.io.loadmat(path, variable_names=("X", "y"))
  except Exception as e:  # scipy raises many types for a bad file.
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e
  x, y = mat.get("X"), mat.get("y")
  if (x is None or y is None or x.dtype != np.uint8 or x.ndim != 4
      or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]
      or not np.issubdtype(y.dtype, np.integer)
      or not np.all((y >= 1) & (y <= 10))):
    raise _malformed(name, path, expected, "wrong variables, types, shapes "
                     "or label values")
  # Like TFDS's svhn_cropped: label 10 is digit 0.
  return x.transpose(3, 0, 1, 2), y.reshape(-1).astype(np.int64) % 10


# ------------------------------------------------------------ Fashion-MNIST


def _read_idx(name: str, path: str, shape: tuple[int, ...]) -> np.ndarray:
  """Reads a gzipped IDX file of uint8 with dims (N, *shape)."""
  ndim = 1 + len(shape)
  expected = f"a gzipped IDX file of uint8 with dims {('N',) + shape}"
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e
  header = 4 + 4 * ndim
  if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
    raise _malformed(name, path, expected,
                     f"bad magic number {data[:4].hex()}")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
  if dims[1:] != shape or len(data) != header + int(np.prod(dims)):
    raise _malformed(name, path, expected,
                     f"dims {dims} with {len(data) - header} data bytes")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_fashion_mnist(data_dir: str, split: str):
  name = "fashion_mnist"
  prefix = "train" if split == "train" else "t10k"
  paths = [os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz")
           for kind in ("images-idx3", "labels-idx1")]
  for path in paths:
    if not os.path.isfile(path):
      raise _missing(name, data_dir, os.path.basename(path))
  images = _read_idx(name, paths[0], (28, 28))
  labels = _read_idx(name, paths[1], ())
  if len(images) != len(labels):
    raise _malformed(name, paths[1], f"{len(images)} labels, one per image "
                     f"of {paths[0]}", f"{len(labels)} labels")
  return images[..., None], labels


READERS: dict[str, Callable[[str, str], tuple[np.ndarray, np.ndarray]]] = {
    "cifar10": _read_cifar10,
    "svhn": _read_svhn,
    "fashion_mnist": _read_fashion_mnist,
}


def read(name: str, split: str, data_dir: str):
  """Reads split ``split`` of dataset ``name`` from the files in data_dir."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"{name} (source=files): data directory {data_dir} does not exist. "
        f"To fill it: {_WHERE[name]}.")
  return READERS[name](data_dir, split)
