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
the file, what was expected and where to get it. Files may be hostile: sizes
and counts are checked against what the dataset can hold (10,000 images per
CIFAR-10 batch; the known split sizes of SVHN and Fashion-MNIST, plus
`_SIZE_MARGIN`) before anything is read or allocated, and labels before they
are converted.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tarfile
from typing import Any, BinaryIO, Callable, NamedTuple
import zlib

import numpy as np
import scipy.io

from cifs_jax.data import restricted_pickle
from cifs_jax.data.info import get_info

_WHERE = {
  "cifar10": (
    "download https://www.cs.toronto.edu/~kriz/"
    "cifar-10-binary.tar.gz (or cifar-10-python.tar.gz) into "
    "config.data.data_dir"
  ),
  "svhn": (
    "download train_32x32.mat and test_32x32.mat from "
    "http://ufldl.stanford.edu/housenumbers/ into "
    "config.data.data_dir"
  ),
  "fashion_mnist": (
    "run `apt-get install dataset-fashion-mnist` (puts "
    "the four files in /usr/share/datasets/fashion-mnist), "
    "or get them from https://github.com/zalandoresearch/"
    "fashion-mnist (data/fashion/) into "
    "config.data.data_dir"
  ),
}


def _missing(name: str, data_dir: str, expected: str) -> FileNotFoundError:
  return FileNotFoundError(
    f"{name} (source=files): expected {expected} in {data_dir}, not found. "
    f"To get it: {_WHERE[name]}."
  )


def _malformed(name: str, path: str, expected: str, problem: str) -> ValueError:
  return ValueError(
    f"{name} (source=files): {path} is malformed ({problem}); expected "
    f"{expected}. To get a good copy: {_WHERE[name]}."
  )


# Room over the known split sizes (another release of a dataset).
_SIZE_MARGIN = 1.1


def _max_examples(name: str, split: str) -> int:
  return math.ceil(get_info(name).num_examples[split] * _SIZE_MARGIN)


def _labels(
  name: str, path: str, expected: str, labels: Any, low: int, high: int
) -> np.ndarray:
  """``labels`` (an array or a list) as int64, once they are all integers in
  low..high; else a malformed-file error."""
  if isinstance(labels, np.ndarray):
    integers = np.issubdtype(labels.dtype, np.integer)
  else:
    integers = all(type(v) is int for v in labels)  # pylint: disable=unidiomatic-typecheck
  if not integers:
    raise _malformed(name, path, expected, "labels that are not integers")
  if len(labels) and not low <= np.min(labels) <= np.max(labels) <= high:
    raise _malformed(name, path, expected, f"labels outside {low}..{high}")
  return np.asarray(labels, np.int64)


# ---------------------------------------------------------------- CIFAR-10

_CIFAR_PIXELS = 32 * 32 * 3  # R, G, B planes of 32x32.
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # A label byte, then the pixels.
_CIFAR_BATCH = 10_000  # Images per batch file.
# The largest batch file. The python version pickles a label and a file name
# per image (~32 bytes in the real batches), and Python 3's protocol 2 writes
# pixel bytes as latin-1 text in UTF-8, up to 2 bytes each.
_CIFAR_MAX_BYTES = _CIFAR_BATCH * (2 * _CIFAR_PIXELS + 256)
# The most pickle opcodes of a python-version batch: Python 3's protocol 2
# takes 9 per image (a label, a file name as _codecs.encode(text)), protocol
# 0 takes 12; each opcode builds at most one object.
_CIFAR_MAX_OPCODES = _CIFAR_BATCH * 16 + 1024
# The archives hold 9 members (the folder, 6 batches, readme.html and
# batches.meta); their headers need no extension blocks (GNU long names, pax
# records) beyond a few KiB.
_TAR_MAX_MEMBERS = 64
_TAR_MAX_EXTENSION_BYTES = 1 << 16
_TAR_EXTENSION_TYPES = (
  tarfile.GNUTYPE_LONGNAME,
  tarfile.GNUTYPE_LONGLINK,
  tarfile.XHDTYPE,
  tarfile.XGLTYPE,
  tarfile.SOLARIS_XHDTYPE,
)


def _cifar_images(
  name: str, path: str, expected: str, pixels: np.ndarray
) -> np.ndarray:
  """(N, 3072) rows of R, G, B planes -> (N, 32, 32, 3), N <= 10,000."""
  if len(pixels) > _CIFAR_BATCH:
    raise _malformed(
      name,
      path,
      expected,
      f"{len(pixels)} images, more than the {_CIFAR_BATCH} of a batch",
    )
  return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _parse_cifar_binary(name: str, path: str, data: bytes):
  expected = (
    "up to 10,000 records of 1 label byte + 3072 pixel bytes (CIFAR-10 binary)"
  )
  if not data or len(data) % _CIFAR_RECORD:
    raise _malformed(
      name,
      path,
      expected,
      f"{len(data)} bytes is not a multiple of {_CIFAR_RECORD}",
    )
  records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
  return (
    _cifar_images(name, path, expected, records[:, 1:]),
    _labels(name, path, expected, records[:, 0], 0, 9),
  )


def _describe(value: Any) -> str:
  if isinstance(value, np.ndarray):
    return f"{value.dtype} {value.shape}"
  return type(value).__name__


def _parse_cifar_pickle(name: str, path: str, data: bytes):
  expected = (
    "a pickled dict with b'data' (uint8, (N, 3072), N <= 10,000) "
    "and b'labels' (N ints in 0..9) (CIFAR-10 python version)"
  )
  try:
    batch = restricted_pickle.loads(data, max_opcodes=_CIFAR_MAX_OPCODES)
  except Exception as e:  # Any failure of the unpickler means a bad file.
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e
  if not isinstance(batch, dict):
    raise _malformed(
      name, path, expected, f"not a dict but a {_describe(batch)}"
    )
  for key in (b"data", b"labels"):
    if key not in batch:
      raise _malformed(name, path, expected, f"no {key!r}")
  pixels, labels = batch[b"data"], batch[b"labels"]
  if not (
    isinstance(pixels, np.ndarray)
    and pixels.dtype == np.uint8
    and pixels.ndim == 2
    and pixels.shape[1] == _CIFAR_PIXELS
  ):
    raise _malformed(name, path, expected, f"b'data' of {_describe(pixels)}")
  if not isinstance(labels, list):
    raise _malformed(name, path, expected, f"b'labels' of {_describe(labels)}")
  if len(labels) != len(pixels):
    raise _malformed(
      name, path, expected, f"{len(labels)} labels for {len(pixels)} images"
    )
  return (
    _cifar_images(name, path, expected, pixels),
    _labels(name, path, expected, labels, 0, 9),
  )


# (archive, its top folder = the extracted folder, train and test members,
#  parser), in order of preference.
_CIFAR_FORMATS = (
  (
    "cifar-10-binary.tar.gz",
    "cifar-10-batches-bin",
    [f"data_batch_{i}.bin" for i in range(1, 6)],
    ["test_batch.bin"],
    _parse_cifar_binary,
  ),
  (
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    [f"data_batch_{i}" for i in range(1, 6)],
    ["test_batch"],
    _parse_cifar_pickle,
  ),
)


def _check_batch_size(name: str, path: str, size: int) -> None:
  if size > _CIFAR_MAX_BYTES:
    raise _malformed(
      name,
      path,
      f"a CIFAR-10 batch file of at most "
      f"{_CIFAR_MAX_BYTES} bytes (10,000 images)",
      f"{size} bytes, more than that",
    )


class _BoundedTarInfo(tarfile.TarInfo):
  """A tar header that refuses, before `tarfile` reads them into memory,
  extension blocks (GNU long names, pax records) over
  `_TAR_MAX_EXTENSION_BYTES` and GNU sparse members."""

  def _proc_member(self, tarfile_):  # pylint: disable=arguments-renamed
    if self.type == tarfile.GNUTYPE_SPARSE:
      raise tarfile.ReadError(f"a GNU sparse member at byte {self.offset}")
    if (
      self.type in _TAR_EXTENSION_TYPES and self.size > _TAR_MAX_EXTENSION_BYTES
    ):
      raise tarfile.ReadError(
        f"an extension header of {self.size} bytes at byte {self.offset}, "
        f"more than {_TAR_MAX_EXTENSION_BYTES}"
      )
    return super()._proc_member(tarfile_)


def _read_members(
  name: str, data_dir: str, archive: str, folder: str, members: list[str]
) -> dict[str, tuple[str, bytes]]:
  """Maps each member to (its path for messages, its bytes), refusing a
  member larger than a batch can be before reading it, and an archive of
  more than `_TAR_MAX_MEMBERS` members or with oversized headers."""
  extracted = os.path.join(data_dir, folder)
  if os.path.isdir(extracted):
    found = {}
    for member in members:
      path = os.path.join(extracted, member)
      if not os.path.isfile(path):
        raise _missing(name, data_dir, f"{folder}/{member}")
      size = os.path.getsize(path)
      _check_batch_size(name, path, size)
      with open(path, "rb") as f:  # Allocates the size read, not the bound.
        found[member] = (path, f.read(size))
    return found
  path = os.path.join(data_dir, archive)
  wanted = {f"{folder}/{m}": m for m in members}
  found = {}
  try:
    with tarfile.open(path, "r:gz", tarinfo=_BoundedTarInfo) as tar:
      # One pass, in archive order: no seeking back.
      for count, info in enumerate(tar, 1):
        if count > _TAR_MAX_MEMBERS:
          raise tarfile.ReadError(f"more than {_TAR_MAX_MEMBERS} members")
        member_path = f"{path}:{info.name}"
        _check_batch_size(name, member_path, info.size)
        if info.name in wanted and info.isfile():
          found[wanted[info.name]] = (member_path, tar.extractfile(info).read())
  # A chain of extension headers recurses in tarfile: RecursionError.
  except (tarfile.TarError, EOFError, OSError, zlib.error, RecursionError) as e:
    raise _malformed(
      name,
      path,
      f"a gzipped tar archive with {folder}/",
      f"{type(e).__name__}: {e}",
    ) from e
  missing = [m for m in members if m not in found]
  if missing:
    raise _malformed(
      name,
      path,
      f"a gzipped tar archive with {folder}/",
      f"members {missing} are missing",
    )
  return found


def _read_cifar10(data_dir: str, split: str):
  name = "cifar10"
  for archive, folder, train, test, parse in _CIFAR_FORMATS:
    if os.path.isfile(os.path.join(data_dir, archive)) or os.path.isdir(
      os.path.join(data_dir, folder)
    ):
      members = train if split == "train" else test
      found = _read_members(name, data_dir, archive, folder, members)
      parts = [parse(name, *found[m]) for m in members]
      return (
        np.concatenate([images for images, _ in parts]),
        np.concatenate([labels for _, labels in parts]),
      )
  raise _missing(
    name,
    data_dir,
    " or ".join(
      f"{archive} (or {folder}/)" for archive, folder, *_ in _CIFAR_FORMATS
    ),
  )


# --------------------------------------------------------------------- SVHN

# MATLAB v5 (https://www.mathworks.com/help/pdf_doc/matlab/matfile_format.pdf):
# a 128-byte file header, then per variable a tag (data type, byte count) and
# an miMATRIX element, maybe inside an miCOMPRESSED (zlib) one. The element
# starts with subelements: array flags (the class in the low byte, complex
# and logical bits above it), dims, name, then the data (of a numeric class:
# a tag with the data's type and byte count, then the data). Only this start
# is read, and inflated at most _MAT_HEADER_BYTES.
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MAT_CLASSES = {
  6: "double",
  7: "single",
  8: "int8",
  9: "uint8",
  10: "int16",
  11: "uint16",
  12: "int32",
  13: "uint32",
  14: "int64",
  15: "uint64",
}
_MAT_INTEGERS = tuple(_MAT_CLASSES.values())[2:]
# Array flag bits above the class byte that change what scipy returns.
_MAT_FLAGS = {0x800: "complex", 0x200: "logical"}
# Bytes per element of each numeric data type (miINT8 ... miUINT64).
_MI_ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MAT_HEADER_BYTES = 1024
# SVHN's files hold X and y; room for a few more.
_MAT_MAX_VARIABLES = 16


class _MatVariable(NamedTuple):
  """What the start of an miMATRIX element declares."""

  shape: tuple[int, ...]
  mclass: str  # e.g. "uint8", "complex uint8", "another class".
  # The data's declared byte count minus what the dims imply (0 for a good
  # array); None where the data is not of a numeric type.
  excess_bytes: int | None


def _mat_tag(start: bytes, offset: int, order: str):
  """(data type, byte count, offset of the data, offset of the next
  subelement) of the subelement tag at ``offset``."""
  first, second = struct.unpack_from(f"{order}2I", start, offset)
  if first >> 16:  # Small format: size and type in 4 bytes, data in 4.
    if first >> 16 > 4:
      raise ValueError(f"a small data element of {first >> 16} bytes")
    return first & 0xFFFF, first >> 16, offset + 4, offset + 8
  return first, second, offset + 8, offset + 8 + -(-second // 8) * 8


def _mat_subelement(start: bytes, offset: int, order: str):
  """(data type, data bytes, offset of the next subelement) at ``offset``."""
  kind, size, data, following = _mat_tag(start, offset, order)
  if data + size > len(start):
    raise ValueError(f"a subelement of {size} bytes in a variable header")
  return kind, start[data : data + size], following


def _mat_variable(start: bytes, order: str) -> tuple[str, _MatVariable]:
  """(name, variable) from the start of an miMATRIX element."""
  kind, _ = struct.unpack_from(f"{order}2I", start)
  kind_flags, flags, offset = _mat_subelement(start, 8, order)
  kind_dims, dims, offset = _mat_subelement(start, offset, order)
  kind_name, name, offset = _mat_subelement(start, offset, order)
  if (kind, kind_flags, kind_dims, kind_name) != (
    _MI_MATRIX,
    _MI_UINT32,
    _MI_INT32,
    _MI_INT8,
  ):
    raise ValueError("a variable header that is not a MATLAB array's")
  shape = struct.unpack(f"{order}{len(dims) // 4}i", dims)
  flag_word = struct.unpack_from(f"{order}I", flags)[0]
  mclass = " ".join(
    [text for bit, text in _MAT_FLAGS.items() if flag_word & bit]
    + [_MAT_CLASSES.get(flag_word & 0xFF, "another class")]
  )
  excess = None
  if mclass in _MAT_CLASSES.values():
    data_type, data_bytes, _, _ = _mat_tag(start, offset, order)
    item_bytes = _MI_ITEM_BYTES.get(data_type)
    if item_bytes is not None:
      excess = data_bytes - math.prod(shape) * item_bytes
  return name.decode("latin-1"), _MatVariable(shape, mclass, excess)


def _mat_headers(f: BinaryIO) -> dict[str, _MatVariable]:
  """Maps each variable of a MATLAB v5 file to what its header declares;
  refuses two variables of one name (scipy would load the first) and more
  than `_MAT_MAX_VARIABLES` variables."""
  header = f.read(128)
  order = {b"IM": "<", b"MI": ">"}.get(header[126:128])
  if len(header) < 128 or order is None:
    raise ValueError("not a MATLAB v5 file header")
  variables = {}
  while tag := f.read(8):
    if len(variables) == _MAT_MAX_VARIABLES:
      raise ValueError(f"more than {_MAT_MAX_VARIABLES} variables")
    kind, size = struct.unpack(f"{order}2I", tag)
    position = f.tell()
    start = f.read(min(size, _MAT_HEADER_BYTES))
    start = (
      zlib.decompressobj().decompress(start, _MAT_HEADER_BYTES)
      if kind == _MI_COMPRESSED
      else tag + start
    )
    name, variable = _mat_variable(start, order)
    if name in variables:
      raise ValueError(f"two variables named {name}")
    variables[name] = variable
    f.seek(position + size)
  return variables


def _check_svhn_header(
  name: str,
  path: str,
  expected: str,
  variables: dict[str, _MatVariable],
  limit: int,
) -> None:
  """Checks X and y from their MATLAB headers."""
  for var in ("X", "y"):
    if var not in variables:
      raise _malformed(name, path, expected, f"no variable {var}")
  x, y = variables["X"], variables["y"]
  if x.mclass != "uint8":
    raise _malformed(name, path, expected, f"X is {x.mclass}")
  if len(x.shape) != 4 or x.shape[:3] != (32, 32, 3):
    raise _malformed(name, path, expected, f"X of shape {x.shape}")
  if x.shape[3] > limit:
    raise _malformed(
      name,
      path,
      expected,
      f"X declares {x.shape[3]} examples, more than the {limit} of the split",
    )
  if y.mclass not in _MAT_INTEGERS:
    raise _malformed(
      name, path, expected, f"labels that are not integers (y is {y.mclass})"
    )
  if math.prod(y.shape) != x.shape[3]:
    raise _malformed(
      name,
      path,
      expected,
      f"{math.prod(y.shape)} labels for {x.shape[3]} images",
    )
  for var, variable in (("X", x), ("y", y)):
    if variable.excess_bytes != 0:
      raise _malformed(
        name,
        path,
        expected,
        f"{var}'s data element does not hold the {math.prod(variable.shape)}"
        f" elements of its dims {variable.shape}",
      )


def _read_mat(
  name: str, path: str, expected: str, read: Callable[..., Any], *args, **kwargs
) -> Any:
  """``read(*args, **kwargs)``, its errors as a malformed-file error."""
  try:
    return read(*args, **kwargs)
  except Exception as e:  # scipy raises many types for a bad file.
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e


def _read_svhn(data_dir: str, split: str):
  name = "svhn"
  path = os.path.join(data_dir, f"{split}_32x32.mat")
  expected = (
    "a MATLAB v5 file with X (uint8, (32, 32, 3, N)) and "
    "y (N labels in 1..10, 10 meaning digit 0)"
  )
  if not os.path.isfile(path):
    raise _missing(name, data_dir, os.path.basename(path))
  # The headers first: nothing is loaded before they are checked.
  with open(path, "rb") as f:
    variables = _read_mat(name, path, expected, _mat_headers, f)
  _check_svhn_header(
    name, path, expected, variables, _max_examples(name, split)
  )
  mat = _read_mat(
    name, path, expected, scipy.io.loadmat, path, variable_names=("X", "y")
  )
  labels = _labels(name, path, expected, mat["y"].reshape(-1), 1, 10)
  # Like TFDS's svhn_cropped: label 10 is digit 0.
  return mat["X"].transpose(3, 0, 1, 2), labels % 10


# ------------------------------------------------------------ Fashion-MNIST

_IDX_UINT8 = b"\0\0\x08"  # IDX magic number: two zeros, uint8, then ndim.


def _idx_expected(shape: tuple[int, ...]) -> str:
  return f"a gzipped IDX file of uint8 with dims {('N',) + shape}"


def _read_gzip(
  name: str, path: str, f: BinaryIO, size: int, expected: str
) -> bytes:
  """Reads at most ``size`` bytes; a bad gzip stream is a malformed file."""
  try:
    return f.read(size)
  except (OSError, EOFError, zlib.error) as e:
    raise _malformed(name, path, expected, f"{type(e).__name__}: {e}") from e


def _read_idx_count(
  name: str, path: str, f: BinaryIO, shape: tuple[int, ...], limit: int
) -> int:
  """Reads the header of an IDX file of uint8 with dims (N, *shape); checks
  N <= limit and returns N."""
  expected = _idx_expected(shape)
  ndim = 1 + len(shape)
  header = _read_gzip(name, path, f, 4 + 4 * ndim, expected)
  if len(header) != 4 + 4 * ndim or header[:4] != _IDX_UINT8 + bytes([ndim]):
    raise _malformed(
      name, path, expected, f"bad magic number {header[:4].hex()}"
    )
  dims = struct.unpack(f">{ndim}I", header[4:])
  if dims[1:] != shape:
    raise _malformed(name, path, expected, f"dims {dims}")
  if dims[0] > limit:
    raise _malformed(
      name,
      path,
      expected,
      f"its header declares {dims[0]} "
      f"examples, more than the {limit} of the split",
    )
  return dims[0]


def _read_idx_data(
  name: str, path: str, f: BinaryIO, dims: tuple[int, ...]
) -> np.ndarray:
  """Reads the uint8 data after the header: exactly prod(dims) bytes."""
  expected = _idx_expected(dims[1:])
  size = math.prod(dims)
  data = _read_gzip(name, path, f, size + 1, expected)
  if len(data) < size:
    raise _malformed(
      name, path, expected, f"dims {dims} with only {len(data)} data bytes"
    )
  if len(data) > size:
    raise _malformed(
      name, path, expected, f"more data after the {dims[0]} declared examples"
    )
  return np.frombuffer(data, np.uint8).reshape(dims)


def _read_fashion_mnist(data_dir: str, split: str):
  name = "fashion_mnist"
  prefix = "train" if split == "train" else "t10k"
  paths = [
    os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz")
    for kind in ("images-idx3", "labels-idx1")
  ]
  for path in paths:
    if not os.path.isfile(path):
      raise _missing(name, data_dir, os.path.basename(path))
  limit = _max_examples(name, split)
  # Both headers first: no data is read before the counts are checked.
  with (
    gzip.open(paths[0], "rb") as images_file,
    gzip.open(paths[1], "rb") as labels_file,
  ):
    count = _read_idx_count(name, paths[0], images_file, (28, 28), limit)
    labels_count = _read_idx_count(name, paths[1], labels_file, (), limit)
    if labels_count != count:
      raise _malformed(
        name,
        paths[1],
        f"{count} labels, one per image of {paths[0]}",
        f"{labels_count} labels",
      )
    images = _read_idx_data(name, paths[0], images_file, (count, 28, 28))
    labels = _read_idx_data(name, paths[1], labels_file, (count,))
  return images[..., None], _labels(
    name, paths[1], _idx_expected(()), labels, 0, 9
  )


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
      f"To fill it: {_WHERE[name]}."
    )
  return READERS[name](data_dir, split)
