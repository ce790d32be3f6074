"""Damaged or hostile data files: each is refused with an error that names
it, without a crash and with bounded memory."""

import codecs
import contextlib
import gzip
import io
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
import scipy.io

from cifs_jax import data
from cifs_jax.data import restricted_pickle
from tests.test_data_files import (
  _BINARY,
  _PYTHON,
  _binary_batch,
  _cifar_batches,
  _config,
  _pickled_batch,
  _write_cifar,
  _write_fashion,
  _write_svhn,
)
from tests.idx_files import write_idx

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MB = 2**20
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's, for protocols 0-4.


class _Reduce:
  """Pickles to whatever ``reduce`` says: how a hostile file is written."""

  def __init__(self, *reduce):
    self.reduce = reduce

  def __reduce__(self):
    return self.reduce


@contextlib.contextmanager
def _address_space_cap(extra_mb):
  """Caps this process's address space at its current size + ``extra_mb``,
  so that a reader allocating gigabytes fails fast (MemoryError) instead of
  taking the machine's memory."""
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) for line in status if "VmSize" in line)
  cap = size * 1024 + extra_mb * _MB
  if hard != resource.RLIM_INFINITY:
    cap = min(cap, hard)
  resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _refused_within(limit_mb, load, match, error=ValueError):
  """Runs ``load``, which must raise ``error`` matching ``match``, and checks
  the peak of traced memory (numpy's arrays included) stays under the limit;
  under an address-space cap of 1 GiB more, in case it does not."""
  tracemalloc.start()
  try:
    with _address_space_cap(1024), pytest.raises(error, match=match):
      load()
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < limit_mb * _MB, f"peak {peak / _MB:.0f} MB"


def _zeros_gzip(megabytes):
  """Concatenated gzip members (a valid gzip stream) inflating to zeros."""
  return gzip.compress(bytes(_MB)) * megabytes


# ------------------------------------------------------------------ pickles


def _object_array():
  """An object array made from raw bytes: a pointer 0x4141414141414141."""
  return _Reduce(np.ndarray, ((1,), np.dtype("O"), b"A" * 8))


def test_object_array_from_bytes_does_not_crash(tmp_path):
  """Before the fix, np.asarray on these labels segfaulted the process."""
  batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_object_array()]}
  blob = pickle.dumps(batch, protocol=2)
  members = {
    m: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    for m in _PYTHON[2]
  }
  members["test_batch"] = blob
  with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
    for member, content in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  code = (
    "import sys; from cifs_jax import data\n"
    "config = data.default_config('cifar10')\n"
    "config.source, config.data_dir = 'files', sys.argv[1]\n"
    "data.load_split(config, 'test')\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)],
    cwd=_REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
  assert "ValueError" in run.stderr
  assert (
    "cifar-10-python.tar.gz:cifar-10-batches-py/test_batch is "
    "malformed" in run.stderr
  )


@pytest.mark.parametrize(
  "value, match",
  [
    (_object_array(), "refusing dtype 'O8'"),
    (
      _Reduce(np.ndarray, ((1,), np.dtype("u8"), b"A" * 8)),
      "refusing numpy.ndarray",
    ),
    # 300,000 images from one byte: a zero-stride array.
    (
      _Reduce(np.ndarray, ((300_000, 3072), np.dtype("u1"), b"\0", 0, (0, 0))),
      "refusing numpy.ndarray",
    ),
    # A uint8 dtype whose state adds a field past its size.
    (
      _Reduce(
        np.dtype,
        ("u1", False, True),
        (3, "|", None, ("a",), {"a": (np.dtype("u8"), 8)}, 16, 1, 0),
      ),
      "refusing dtype state",
    ),
    (np.zeros(2, object), "refusing dtype 'O8'"),
    (np.zeros(2, "u1,f4"), "refusing dtype 'V5'"),
    (np.array(["ab"]), "refusing dtype 'U2'"),
    (
      _Reduce(
        _RECONSTRUCT,
        (np.ndarray, (0,), b"b"),
        (1, (4,), np.dtype("u1"), False, b"\0" * 3),
      ),
      "3 data bytes for shape \\(4,\\)",
    ),
    (
      _Reduce(
        _RECONSTRUCT,
        (np.ndarray, (0,), b"b"),
        (1, (-1,), np.dtype("u1"), False, b""),
      ),
      "shape \\(-1,\\)",
    ),
    (
      _Reduce(
        _RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (2,), "u1", False, b"ab")
      ),
      "dtype 'u1'",
    ),
    (
      _Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b")),
      "array without its state",
    ),
    (_Reduce(codecs.encode, ("x", "zlib_codec")), "refusing _codecs.encode"),
  ],
  ids=[
    "object-from-bytes",
    "from-bytes",
    "zero-stride",
    "forged-dtype-state",
    "object-dtype",
    "structured-dtype",
    "str-dtype",
    "short-data",
    "negative-dim",
    "str-for-dtype",
    "no-state",
    "codec",
  ],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_restricted_unpickler_refuses_unsafe_arrays(value, match, protocol):
  with pytest.raises(pickle.UnpicklingError, match=match):
    restricted_pickle.loads(
      pickle.dumps({b"x": [value]}, protocol=protocol), max_opcodes=1000
    )


@pytest.mark.parametrize(
  "blob",
  [
    # BINBYTES8 declaring 8 GiB; LONG_BINPUT at memo index 2**27.
    b"\x80\x04\x8e" + (2**33).to_bytes(8, "little") + b"ab.",
    b"\x80\x02]r" + (2**27).to_bytes(4, "little") + b".",
  ],
  ids=["bytes-length", "memo-index"],
)
def test_restricted_unpickler_bounds_memory(blob):
  """Before the fix: 8 GiB traced and 2 GB resident for a few bytes."""
  _refused_within(
    10,
    lambda: restricted_pickle.loads(blob, max_opcodes=1000),
    "but only 3 remain|memo index 134217728",
    pickle.UnpicklingError,
  )


def test_restricted_unpickler_keeps_byte_order_and_types():
  value = {
    "be": np.arange(5, dtype=">u4"),
    "f": np.eye(3, dtype=np.float32),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "c": np.array([1 + 2j]),
    "b": np.array([True, False]),
    "shared": (np.arange(2),) * 2,
    "dtype": np.dtype("<i2"),
    "empty": np.zeros((0, 3), np.uint8),
  }
  for protocol in (0, 2, 4, 5):
    loaded = restricted_pickle.loads(
      pickle.dumps(value, protocol=protocol), max_opcodes=1000
    )
    for key in ("be", "f", "fortran", "c", "b", "empty"):
      np.testing.assert_array_equal(loaded[key], value[key])
      assert loaded[key].dtype == value[key].dtype
    assert loaded["shared"][0] is loaded["shared"][1]
    assert loaded["dtype"] == np.dtype("<i2")


def test_real_size_cifar_python_batch(tmp_path):
  """A batch as numpy pickles the real ones (10,000 images, file names)."""
  batches = _cifar_batches()
  batches[5] = (
    np.random.default_rng(5).integers(
      0, 256, (10_000, 32, 32, 3), dtype=np.uint8
    ),
    np.arange(10_000) % 10,
  )
  _write_cifar(tmp_path, _PYTHON, batches, extracted=True)
  test = data.load_split(_config("cifar10", str(tmp_path)), "test")
  np.testing.assert_array_equal(test.images, batches[5][0])
  np.testing.assert_array_equal(test.labels, batches[5][1])


# ----------------------------------------------------------------- CIFAR-10


def _cifar_with_test_batch(directory, blob):
  batches = _cifar_batches()
  _write_cifar(directory, _PYTHON, batches, extracted=True)
  (directory / "cifar-10-batches-py" / "test_batch").write_bytes(blob)


@pytest.mark.parametrize(
  "batch, match",
  [
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no b'labels'"),
    ({b"labels": [1, 2]}, "no b'data'"),
    ([1, 2], "not a dict"),
    (
      {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]},
      "labels outside 0..9",
    ),
    (
      {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, -1]},
      "labels outside 0..9",
    ),
    (
      {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2.5]},
      "labels that are not integers",
    ),
    (
      {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]},
      r"1 labels for 2 images",
    ),
    (
      {b"data": np.zeros((2, 3071), np.uint8), b"labels": [1, 2]},
      r"b'data' of uint8 \(2, 3071\)",
    ),
  ],
  ids=[
    "no-labels",
    "no-data",
    "list",
    "label-10",
    "label-neg",
    "float",
    "count",
    "width",
  ],
)
def test_bad_cifar_python_batch(tmp_path, batch, match):
  _cifar_with_test_batch(tmp_path, pickle.dumps(batch, protocol=2))
  with pytest.raises(ValueError, match=f"test_batch is malformed.*{match}"):
    data.load_split(_config("cifar10", str(tmp_path)), "test")


def test_cifar_pickle_of_many_objects_is_refused(tmp_path):
  """8 MB of EMPTY_SET opcodes, each a new 216-byte set: before the fix the
  unpickler built 1.7 GB of sets (16 GB for a 64 MB batch file)."""
  _cifar_with_test_batch(tmp_path, b"\x80\x04" + b"\x8f" * (8 * _MB) + b".")
  _refused_within(
    50,
    lambda: data.load_split(_config("cifar10", str(tmp_path)), "test"),
    "test_batch is malformed.*more than 161024 opcodes",
  )


@pytest.mark.parametrize(
  "fmt, encode",
  [(_BINARY, _binary_batch), (_PYTHON, _pickled_batch)],
  ids=["binary", "python"],
)
def test_cifar_label_out_of_range(tmp_path, fmt, encode):
  _write_cifar(tmp_path, fmt, _cifar_batches(), extracted=True)
  path = tmp_path / fmt[1] / fmt[2][-1]
  images, labels = _cifar_batches()[5]
  path.write_bytes(encode(images, labels + 10))
  with pytest.raises(
    ValueError, match=f"{path} is malformed.*labels outside 0..9"
  ):
    data.load_split(_config("cifar10", str(tmp_path)), "test")


class _Zeros(io.RawIOBase):
  """A stream of zero bytes, for a big tar member without holding it."""

  def readinto(self, buffer):
    buffer[:] = bytes(len(buffer))
    return len(buffer)


@pytest.mark.parametrize(
  "extracted", [False, True], ids=["archive", "extracted"]
)
def test_oversized_cifar_member_is_not_read(tmp_path, extracted):
  """A 200 MB member compresses to 0.2 MB: refused before it is read."""
  _write_cifar(tmp_path, _PYTHON, _cifar_batches(), extracted=extracted)
  member = "cifar-10-batches-py/test_batch"
  if extracted:
    with open(tmp_path / member, "wb") as f:
      f.truncate(200 * _MB)
  else:
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "r:gz") as tar:
      kept = [(i, tar.extractfile(i).read()) for i in tar if i.name != member]
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
      for info, content in kept:
        tar.addfile(info, io.BytesIO(content))
      info = tarfile.TarInfo(member)
      info.size = 200 * _MB
      tar.addfile(info, _Zeros())
  _refused_within(
    100,
    lambda: data.load_split(_config("cifar10", str(tmp_path)), "test"),
    "test_batch is malformed.*209715200 bytes, more than",
  )


def _tar_header(name, size, kind=tarfile.REGTYPE):
  info = tarfile.TarInfo(name)
  info.size, info.type = size, kind
  return info.tobuf(tarfile.GNU_FORMAT)


def test_tar_of_many_members_is_refused(tmp_path):
  """The real members, then 200,000 empty ones (0.3 MB gzipped): before the
  fix all their headers were read and kept, 1.1 GB for 2 million."""
  _write_cifar(tmp_path, _PYTHON, _cifar_batches())
  path = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(path, "r:gz") as tar:
    tar.getmembers()
    end = tar.offset  # Where the end-of-archive blocks start.
  with gzip.open(path, "rb") as f:
    archive = f.read()[:end]
  padding = _tar_header("cifar-10-batches-py/pad", 0) * 200_000
  path.write_bytes(gzip.compress(archive + padding, compresslevel=1))
  _refused_within(
    20,
    lambda: data.load_split(_config("cifar10", str(tmp_path)), "test"),
    f"{path} is malformed.*more than 64 members",
  )


@pytest.mark.parametrize(
  "kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE], ids=["gnu", "pax"]
)
def test_tar_extension_header_claiming_a_gib_is_not_read(tmp_path, kind):
  """A GNU long name or pax header declaring 1 GiB, then 600 MB of zeros
  (0.6 MB gzipped): before the fix tarfile read them all into memory."""
  path = tmp_path / "cifar-10-python.tar.gz"
  header = _tar_header("././@LongLink", 2**30, kind)
  path.write_bytes(gzip.compress(header) + _zeros_gzip(600))
  _refused_within(
    20,
    lambda: data.load_split(_config("cifar10", str(tmp_path)), "test"),
    f"{path} is malformed.*extension header of 1073741824 bytes",
  )


def _pax_record_block():
  """A pax header of one small record, in its two blocks."""
  record = b"16 comment=abcd\n"
  header = _tar_header("PaxHeaders/x", len(record), tarfile.XHDTYPE)
  return header + record + bytes(512 - len(record))


@pytest.mark.parametrize(
  "blob, match",
  [
    (_pax_record_block() * 5000, "RecursionError"),
    (_tar_header("sparse", 0, tarfile.GNUTYPE_SPARSE), "a GNU sparse member"),
  ],
  ids=["pax-chain", "sparse"],
)
def test_tar_header_chains_and_sparse_members_are_refused(
  tmp_path, blob, match
):
  """Each pax header makes tarfile recurse for the next one."""
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(gzip.compress(blob))
  with pytest.raises(ValueError, match=f"{path} is malformed.*{match}"):
    data.load_split(_config("cifar10", str(tmp_path)), "test")


# ------------------------------------------------------------ Fashion-MNIST


def test_idx_trailing_data_is_not_read(tmp_path):
  """One image, then 200 MB of zeros in a 0.2 MB file: before the fix the
  loader read all of it before refusing it."""
  _write_fashion(tmp_path)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  one = np.zeros((1, 28, 28), np.uint8)
  header = bytes([0, 0, 8, 3]) + np.array([1, 28, 28], ">u4").tobytes()
  path.write_bytes(gzip.compress(header + one.tobytes()) + _zeros_gzip(200))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(1, np.uint8))
  _refused_within(
    100,
    lambda: data.load_split(_config("fashion_mnist", str(tmp_path)), "test"),
    f"{path} is malformed.*more data after the 1 declared",
  )


def test_idx_count_beyond_the_split_is_not_read(tmp_path):
  _write_fashion(tmp_path)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  write_idx(path, np.zeros(5, np.uint8), count=1_000_000)
  with pytest.raises(
    ValueError,
    match=f"{path} is malformed.*declares "
    "1000000 examples, more than the 66000",
  ):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "train")


@pytest.mark.parametrize(
  "kind, content, match",
  [
    ("images-idx3", b"\0\0\x08\x01" + b"\0" * 100, "bad magic number 00000801"),
    ("images-idx3", b"\x1f\x8b" + b"\0" * 30, "gzip"),
    ("labels-idx1", None, r"5 labels\); expected 7 labels, one per image"),
    ("labels-idx1", "label-11", "labels outside 0..9"),
  ],
  ids=["magic", "not-gzip", "count-mismatch", "label-range"],
)
def test_bad_idx_file(tmp_path, kind, content, match):
  images, labels = _write_fashion(tmp_path)
  path = tmp_path / f"t10k-{kind}-ubyte.gz"
  if content is None:
    write_idx(path, labels[:5].astype(np.uint8))
  elif content == "label-11":
    write_idx(path, np.full(len(images), 11, np.uint8))
  elif content.startswith(b"\x1f\x8b"):
    path.write_bytes(content)
  else:
    path.write_bytes(gzip.compress(content))
  with pytest.raises(ValueError, match=f"{path} is malformed.*{match}"):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "test")


def test_corrupt_gzip_stream_is_named(tmp_path):
  _write_fashion(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  blob = bytearray(path.read_bytes())
  blob[20:60] = b"\xff" * 40
  path.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=f"{path} is malformed"):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "train")


# --------------------------------------------------------------------- SVHN


def test_svhn_float_images_are_not_loaded(tmp_path):
  """X of float64 (201 MB, 0.2 MB compressed): refused from its header."""
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  scipy.io.savemat(
    path,
    {"X": np.zeros((32, 32, 3, 8192)), "y": np.ones((8192, 1), np.uint8)},
    do_compression=True,
  )
  _refused_within(
    100,
    lambda: data.load_split(_config("svhn", str(tmp_path)), "test"),
    f"{path} is malformed.*X is double",
  )


@pytest.mark.parametrize(
  "variables, match",
  [
    (
      {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]])},
      "labels outside 1..10",
    ),
    (
      {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [1]])},
      "labels outside 1..10",
    ),
    (
      {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1.5], [1]])},
      "labels that are not integers",
    ),
    (
      {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)},
      "3 labels for 2 images",
    ),
    (
      {"X": np.zeros((32, 32, 2, 2), np.uint8), "y": np.ones((2, 1))},
      r"X of shape \(32, 32, 2, 2\)",
    ),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "no variable y"),
    (
      {"X": np.zeros((32, 32, 3, 30_000), np.uint8), "y": np.ones((30_000, 1))},
      "30000 examples, more than the 28636",
    ),
  ],
  ids=[
    "label-11",
    "label-0",
    "float-label",
    "count",
    "shape",
    "no-y",
    "too-many",
  ],
)
def test_bad_svhn_file(tmp_path, variables, match):
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  scipy.io.savemat(path, variables, do_compression=True)
  with pytest.raises(ValueError, match=f"{path} is malformed.*{match}"):
    data.load_split(_config("svhn", str(tmp_path)), "test")


def _mat_variables(**variables):
  """The variable elements of an uncompressed MATLAB v5 file, without its
  128-byte header."""
  stream = io.BytesIO()
  scipy.io.savemat(stream, variables)
  return stream.getvalue()[128:]


def _mat_file(path, *elements):
  """Writes a MATLAB v5 header (little-endian) and the variable elements."""
  stream = io.BytesIO()
  scipy.io.savemat(stream, {})
  path.write_bytes(stream.getvalue()[:128] + b"".join(elements))


# An uncompressed miMATRIX element of X (32, 32, 3, N) as savemat writes it:
# tag, flags, dims, name "X" (small format), then the data tag at _X_DATA.
_X_FLAGS, _X_DATA = 16, 56


def _labels_element(count):
  return _mat_variables(y=np.ones((count, 1), np.uint8))


def test_svhn_second_variable_of_one_name_is_refused(tmp_path):
  """X of 2,000 images, then X of 10 with 10 labels: before the fix the
  header check took the second X and scipy loaded the first."""
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  _mat_file(
    path,
    _mat_variables(X=np.zeros((32, 32, 3, 2000), np.uint8)),
    _mat_variables(X=np.zeros((32, 32, 3, 10), np.uint8)),
    _labels_element(10),
  )
  with pytest.raises(
    ValueError, match=f"{path} is malformed.*two variables named X"
  ):
    data.load_split(_config("svhn", str(tmp_path)), "test")


def test_svhn_data_element_larger_than_its_dims_is_not_read(tmp_path):
  """X of dims (32, 32, 3, 10) whose compressed data element declares 1 GiB
  and inflates to 600 MB (0.6 MB compressed): before the fix scipy read it
  all."""
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  element = bytearray(
    _mat_variables(X=np.zeros((32, 32, 3, 10), np.uint8))[: _X_DATA + 8]
  )
  struct.pack_into("<I", element, 4, 2**30 + _X_DATA)  # The element's size.
  struct.pack_into("<I", element, _X_DATA + 4, 2**30)  # The data's size.
  deflate = zlib.compressobj(1)
  compressed = deflate.compress(bytes(element)) + b"".join(
    deflate.compress(bytes(_MB)) for _ in range(600)
  )
  compressed += deflate.flush()
  _mat_file(
    path,
    struct.pack("<2I", 15, len(compressed)) + compressed,  # miCOMPRESSED
    _labels_element(10),
  )
  _refused_within(
    20,
    lambda: data.load_split(_config("svhn", str(tmp_path)), "test"),
    f"{path} is malformed.*X's data element does not hold the 30720 "
    r"elements of its dims \(32, 32, 3, 10\)",
  )


@pytest.mark.parametrize(
  "flag, attribute", [(0x800, "complex"), (0x200, "logical")]
)
def test_svhn_uint8_flagged_complex_or_logical_is_refused(
  tmp_path, flag, attribute
):
  """Before the fix only the class byte was checked: a complex X came back
  as complex128 images, a logical one as bool."""
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  element = bytearray(_mat_variables(X=np.zeros((32, 32, 3, 2), np.uint8)))
  imaginary = struct.pack("<2I", 2, 32 * 32 * 3 * 2) + bytes(32 * 32 * 3 * 2)
  if flag == 0x800:  # A complex array has an imaginary part after the real.
    element += imaginary
    struct.pack_into("<I", element, 4, len(element) - 8)
  flags = struct.unpack_from("<I", element, _X_FLAGS)[0]
  struct.pack_into("<I", element, _X_FLAGS, flags | flag)
  _mat_file(path, bytes(element), _labels_element(2))
  with pytest.raises(
    ValueError, match=f"{path} is malformed.*X is {attribute} uint8"
  ):
    data.load_split(_config("svhn", str(tmp_path)), "test")


def test_svhn_file_of_many_variables_is_refused(tmp_path):
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  scipy.io.savemat(
    path,
    {
      "X": np.zeros((32, 32, 3, 1), np.uint8),
      "y": np.ones((1, 1), np.uint8),
      **{f"v{i}": np.zeros(1) for i in range(15)},
    },
  )
  with pytest.raises(
    ValueError, match=f"{path} is malformed.*more than 16 variables"
  ):
    data.load_split(_config("svhn", str(tmp_path)), "test")
