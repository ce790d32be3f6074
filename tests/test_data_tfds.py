"""The ``tfds`` source, without TensorFlow: under `tfds.testing.mock_data`,
and on real ArrayRecord files that a tiny builder writes."""

import importlib.util
import io

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from cifs_jax import data
from cifs_jax.data import tfds_source


def _config(name, data_dir=None):
  config = data.default_config(name)
  config.data_dir = data_dir
  return config


@pytest.fixture
def mock_tfds(monkeypatch):
  """`mock_data` whose data sources also serve batched reads.

  TFDS 4.9.10's mock installs ``__getitems__(self, keys, generator)`` as a
  plain attribute of a MagicMock, so ``self`` is never bound and every
  batched read fails; this replaces it with the same function minus ``self``
  (the mock's examples are unchanged).
  """
  monkeypatch.setattr(
    mocking,
    "_getitems",
    lambda keys, generator, serialized=False: [generator[k] for k in keys],
  )
  # The mock serves every dataset as if its server answered.
  monkeypatch.setattr(tfds_source, "server_unreachable", lambda host: None)
  return tfds.testing.mock_data


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_offline_fails_at_once_with_what_to_do_and_cleans_up(
  tmp_path, monkeypatch, name
):
  """Not prepared and no network: one clear error before TFDS tries to
  download (no minutes of retries), naming the files source and the
  Fashion-MNIST smoke run; the folders TFDS began are removed."""
  info = data.get_info(name)
  # TensorFlow is installed (requirements-prepare.txt): TFDS would download.
  monkeypatch.setattr(tfds_source, "find_spec", lambda module: object())
  monkeypatch.setattr(
    tfds_source, "server_unreachable", lambda host: "Network is unreachable"
  )

  def prepare(self, *args, **kwargs):
    (tmp_path / info.tfds_name / "incomplete.ABC123").mkdir(parents=True)
    raise AssertionError("TFDS tried to download")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  (tmp_path / info.tfds_name).mkdir()
  (tmp_path / info.tfds_name / "incomplete.OLD").mkdir()  # Not ours.
  with pytest.raises(
    tfds_source.DatasetUnavailableError,
    match=r"cannot be downloaded: .* does not answer \(Network is "
    r"unreachable\).*--config.data.source=files.*fmnist_resnet10.py:smoke",
  ):
    data.load_split(_config(name, str(tmp_path)), "train")
  assert sorted(p.name for p in (tmp_path / info.tfds_name).iterdir()) == [
    "incomplete.OLD"
  ]


def test_a_failed_download_removes_the_folders_it_began(tmp_path, monkeypatch):
  info = data.get_info("cifar10")
  monkeypatch.setattr(tfds_source, "server_unreachable", lambda host: None)

  def prepare(self, *args, **kwargs):
    (tmp_path / info.tfds_name / "incomplete.XYZ").mkdir(parents=True)
    raise ConnectionError("the server went away")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(ConnectionError):
    data.load_split(_config("cifar10", str(tmp_path)), "train")
  assert not list((tmp_path / info.tfds_name).iterdir())


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_mock_data(mock_tfds, name):
  info = data.get_info(name)
  with mock_tfds(num_examples=9):
    split = data.load_split(_config(name), "train")
    expected = [
      tfds.data_source(info.tfds_name, split="train")[i] for i in range(9)
    ]
  assert split.images.shape == (9, *info.image_shape)
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  assert split.num_classes == 10
  np.testing.assert_array_equal(split.images, [e["image"] for e in expected])
  np.testing.assert_array_equal(split.labels, [e["label"] for e in expected])


def test_reads_in_chunks(mock_tfds, monkeypatch):
  """More examples than one chunk: every example arrives once, in order."""
  monkeypatch.setattr(tfds_source, "_CHUNK", 4)
  reads = []
  getitems = mocking._getitems  # The fixture's.

  def recording_getitems(keys, generator, serialized=False):
    reads.append(list(keys))
    return getitems(keys, generator, serialized)

  monkeypatch.setattr(mocking, "_getitems", recording_getitems)
  with mock_tfds(num_examples=10):
    split = data.load_split(_config("cifar10"), "train")
    reads_by_loader = list(reads)
    expected = [
      tfds.data_source("cifar10", split="train")[i] for i in range(10)
    ]
  assert reads_by_loader == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  np.testing.assert_array_equal(split.images, [e["image"] for e in expected])
  np.testing.assert_array_equal(split.labels, [e["label"] for e in expected])


def _prepare_tiny(data_dir, name, images, labels):
  """Writes a dataset in the ArrayRecord format that `data_source` reads,
  under the real builder's name and version, with PNGs encoded by Pillow
  (TFDS itself would need TensorFlow to encode them)."""
  info = data.get_info(name)
  builder_name = info.tfds_name

  class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # A module name without dots: TFDS then looks for no checksums file
    # (which would need importlib_resources, a requirements-prepare.txt
    # package).
    __module__ = "tiny_builder"
    name = builder_name
    VERSION = tfds.builder_cls(builder_name).VERSION

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=info.image_shape),
            "label": tfds.features.ClassLabel(names=info.class_names),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        png = io.BytesIO()
        PIL.Image.fromarray(
          image.squeeze(-1) if image.shape[-1] == 1 else image
        ).save(png, format="png")
        yield i, {"image": png.getvalue(), "label": label}

  Tiny(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_prepared_array_record_files(tmp_path, name):
  info = data.get_info(name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, *info.image_shape), dtype=np.uint8)
  labels = rng.permutation(10)  # One per class: the label identifies it.
  _prepare_tiny(str(tmp_path), name, images, labels)
  split = data.load_split(_config(name, str(tmp_path)), "test")
  # TFDS stores the examples in its own order.
  order = np.argsort(split.labels)
  np.testing.assert_array_equal(split.labels[order], np.arange(10))
  np.testing.assert_array_equal(split.images[order], images[np.argsort(labels)])


@pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is not None,
  reason="with TensorFlow, TFDS would try to download",
)
def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(
    RuntimeError,
    match="not prepared.*requirements-prepare"
    ".*cifs_jax.data.prepare --name=svhn",
  ):
    data.load_split(_config("svhn", str(tmp_path)), "test")
