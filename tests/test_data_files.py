"""The ``files`` source: real Fashion-MNIST, tiny CIFAR-10 and SVHN files
written in their original formats, the restricted unpickler, clear errors."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io

from cifs_jax import data
from cifs_jax.data import restricted_pickle
from tests.idx_files import needs_fashion_mnist, write_idx


def _config(name, data_dir=None):
  config = data.default_config(name)
  config.source = "files"
  config.data_dir = data_dir
  return config


def _random_images(n, shape, seed):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (n, *shape), dtype=np.uint8),
    rng.integers(0, 10, n).astype(np.int32),
  )


# ------------------------------------------------------------ Fashion-MNIST


@needs_fashion_mnist
def test_real_fashion_mnist_from_debian_package():
  """Default path, no data_dir: the files of `dataset-fashion-mnist`."""
  for split in ("train", "test"):
    total = data.get_info("fashion_mnist").num_examples[split]
    assert total == {"train": 60_000, "test": 10_000}[split]
    s = data.load_split(_config("fashion_mnist"), split)
    assert s.images.shape == (total, 28, 28, 1)
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    assert s.num_classes == 10
    np.testing.assert_array_equal(
      np.bincount(s.labels, minlength=10), [total // 10] * 10
    )
    assert 0 < s.images.mean() < 255


def _fashion_split(split, n=7):
  """The examples `_write_fashion` writes for ``split``: n + 1 for train."""
  return _random_images(
    n + (split == "train"), (28, 28), seed=int(split == "train")
  )


def _write_fashion(directory):
  """Writes both splits; returns the test split's (images, labels)."""
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images, labels = _fashion_split(split)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(
      directory / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8)
    )
  return images, labels


def test_tiny_fashion_mnist(tmp_path):
  """Each split returns its own arrays."""
  _write_fashion(tmp_path)
  for split in ("train", "test"):
    images, labels = _fashion_split(split)
    s = data.load_split(_config("fashion_mnist", str(tmp_path)), split)
    np.testing.assert_array_equal(s.images, images[..., None])
    np.testing.assert_array_equal(s.labels, labels)


def test_truncated_idx_file_is_named(tmp_path):
  _write_fashion(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(ValueError, match=f"{path}.*gzipped IDX.*apt-get"):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "train")


def test_idx_file_shorter_than_its_header_says(tmp_path):
  images, labels = _write_fashion(tmp_path)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  write_idx(path, images, count=len(images) + 1)
  write_idx(
    tmp_path / "t10k-labels-idx1-ubyte.gz",
    labels.astype(np.uint8),
    count=len(images) + 1,
  )
  with pytest.raises(ValueError, match=r"t10k-images.*dims \(8, 28, 28\)"):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "test")


def test_missing_file_names_file_and_how_to_get_it(tmp_path):
  _write_fashion(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(
    FileNotFoundError, match="t10k-labels-idx1-ubyte.gz.*dataset-fashion-mnist"
  ):
    data.load_split(_config("fashion_mnist", str(tmp_path)), "test")


def test_missing_directory(tmp_path):
  missing = tmp_path / "nowhere"
  for name in data.DATASETS:
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
      data.load_split(_config(name, str(missing)), "train")


def test_files_source_needs_a_directory_for_cifar():
  with pytest.raises(ValueError, match="data_dir must name the directory"):
    data.load_split(_config("cifar10"), "train")


# ----------------------------------------------------------------- CIFAR-10


def _cifar_rows(images):
  """(N, 32, 32, 3) -> (N, 3072): R, G, B planes, as in the CIFAR files."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _cifar_batches(n_per_batch=3):
  """Five training batches and one test batch of random images."""
  return [_random_images(n_per_batch, (32, 32, 3), seed=i) for i in range(6)]


def _binary_batch(images, labels):
  return np.concatenate(
    [labels.astype(np.uint8)[:, None], _cifar_rows(images)], axis=1
  ).tobytes()


def _pickled_batch(images, labels):
  """A batch like the python version's: a protocol-2 pickle whose arrays
  name numpy.core, as the original (numpy < 2) files do."""
  batch = {
    b"batch_label": b"test batch",
    b"labels": labels.tolist(),
    b"data": _cifar_rows(images),
    b"filenames": [b"x_%d.png" % i for i in range(len(labels))],
  }
  blob = pickle.dumps(batch, protocol=2)
  return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


_BINARY = (
  "cifar-10-binary.tar.gz",
  "cifar-10-batches-bin",
  [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"],
  _binary_batch,
)
_PYTHON = (
  "cifar-10-python.tar.gz",
  "cifar-10-batches-py",
  [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
  _pickled_batch,
)


def _write_cifar(directory, fmt, batches, extracted=False):
  archive, folder, members, encode = fmt
  blobs = {
    f"{folder}/{m}": encode(*b) for m, b in zip(members, batches, strict=True)
  }
  blobs[f"{folder}/readme.html"] = b"<html></html>"
  if extracted:
    for name, blob in blobs.items():
      (directory / name).parent.mkdir(parents=True, exist_ok=True)
      (directory / name).write_bytes(blob)
    return
  with tarfile.open(directory / archive, "w:gz") as tar:
    for name, blob in blobs.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("fmt", [_BINARY, _PYTHON], ids=["binary", "python"])
@pytest.mark.parametrize(
  "extracted", [False, True], ids=["archive", "extracted"]
)
def test_tiny_cifar10(tmp_path, fmt, extracted):
  batches = _cifar_batches()
  _write_cifar(tmp_path, fmt, batches, extracted)
  train = data.load_split(_config("cifar10", str(tmp_path)), "train")
  np.testing.assert_array_equal(
    train.images, np.concatenate([b[0] for b in batches[:5]])
  )
  np.testing.assert_array_equal(
    train.labels, np.concatenate([b[1] for b in batches[:5]])
  )
  test = data.load_split(_config("cifar10", str(tmp_path)), "test")
  np.testing.assert_array_equal(test.images, batches[5][0])
  np.testing.assert_array_equal(test.labels, batches[5][1])
  assert test.images.dtype == np.uint8 and test.labels.dtype == np.int32


def test_cifar10_missing_files(tmp_path):
  with pytest.raises(
    FileNotFoundError,
    match="cifar-10-binary.tar.gz.*cifar-10-python.tar.gz.*www.cs.toronto.edu",
  ):
    data.load_split(_config("cifar10", str(tmp_path)), "test")
  _write_cifar(tmp_path, _BINARY, _cifar_batches(), extracted=True)
  os.remove(tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin")
  with pytest.raises(FileNotFoundError, match="data_batch_3.bin"):
    data.load_split(_config("cifar10", str(tmp_path)), "train")


def test_truncated_cifar10_archive(tmp_path):
  _write_cifar(tmp_path, _BINARY, _cifar_batches())
  path = tmp_path / "cifar-10-binary.tar.gz"
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  with pytest.raises(ValueError, match=f"{path} is malformed.*gzipped tar"):
    data.load_split(_config("cifar10", str(tmp_path)), "test")


def test_truncated_cifar10_binary_batch(tmp_path):
  _write_cifar(tmp_path, _BINARY, _cifar_batches(), extracted=True)
  path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match="test_batch.bin is malformed.*3073"):
    data.load_split(_config("cifar10", str(tmp_path)), "test")


class _RunsCode:
  """Pickles to a call of os.system: what a tampered file can do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  blob = pickle.dumps({b"data": _RunsCode(marker)}, protocol=2)
  with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
    restricted_pickle.loads(blob, max_opcodes=1000)
  assert not marker.exists()
  # The same through the loader, in a tampered CIFAR-10 python archive.
  batches = _cifar_batches()
  _write_cifar(tmp_path, _PYTHON, batches, extracted=True)
  (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
  with pytest.raises(ValueError, match="test_batch is malformed.*refusing"):
    data.load_split(_config("cifar10", str(tmp_path)), "test")
  assert not marker.exists()


def test_restricted_unpickler_loads_plain_data():
  value = {
    b"a": [1, 2.5, "s", b"b", (None, True)],
    "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
  }
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    loaded = restricted_pickle.loads(
      pickle.dumps(value, protocol=protocol), max_opcodes=1000
    )
    assert loaded[b"a"] == value[b"a"]
    np.testing.assert_array_equal(loaded["arr"], value["arr"])


# --------------------------------------------------------------------- SVHN


def _svhn_split(split, n=5):
  """The examples `_write_svhn` writes for ``split``: n + 1 for train."""
  images, labels = _random_images(
    n + (split == "train"), (32, 32, 3), seed=1 + (split == "train")
  )
  labels[0] = 0  # Written as 10 in the file.
  return images, labels


def _write_svhn(directory):
  for split in ("train", "test"):
    images, labels = _svhn_split(split)
    mat_labels = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
    scipy.io.savemat(
      directory / f"{split}_32x32.mat",
      {"X": images.transpose(1, 2, 3, 0), "y": mat_labels},
    )


def test_tiny_svhn(tmp_path):
  """Each split returns its own arrays."""
  _write_svhn(tmp_path)
  for split in ("train", "test"):
    images, labels = _svhn_split(split)
    s = data.load_split(_config("svhn", str(tmp_path)), split)
    np.testing.assert_array_equal(s.images, images)
    np.testing.assert_array_equal(s.labels, labels)


def test_truncated_svhn_file(tmp_path):
  _write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(ValueError, match=f"{path} is malformed.*MATLAB v5"):
    data.load_split(_config("svhn", str(tmp_path)), "test")


def test_svhn_missing_file(tmp_path):
  with pytest.raises(
    FileNotFoundError, match="train_32x32.mat.*ufldl.stanford.edu"
  ):
    data.load_split(_config("svhn", str(tmp_path)), "train")
