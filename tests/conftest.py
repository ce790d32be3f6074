"""Test configuration: two fake CPU devices, float64 on demand."""

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

# Must run before any JAX computation initialises the CPU backend.
jax.config.update("jax_num_cpu_devices", 2)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache private to the module that uses it
  (its directory is yielded, e.g. for subprocesses): programs compiled again
  (a new ``jax.jit`` of the same model) are read back instead of compiled.
  It changes no result."""
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  previous = jax.config.values["jax_compilation_cache_dir"]
  jax.config.update("jax_compilation_cache_dir", directory)
  compilation_cache.reset_cache()
  yield directory
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


# Points of the exported model's test set (the official cross-check's >= 300).
EXPORTED_POINTS = 300


@pytest.fixture(scope="session")
def exported_resnet10(tmp_path_factory):
  """(JAX logits_fn, PyTorch model, x (300, 28, 28, 1), y (300,)) of a
  width-8 ResNet-10 trained on real Fashion-MNIST and exported to PyTorch
  (tests/exported_resnet10.py), shared by the PyTorch cross-checks."""
  pytest.importorskip("torch")
  from tests import exported_resnet10  # noqa: PLC0415 (needs torch)

  if not exported_resnet10.HAS_FASHION_MNIST:
    pytest.skip("needs Debian's dataset-fashion-mnist")
  return exported_resnet10.train_and_export(
    tmp_path_factory.mktemp("fmnist_vanilla"),
    width=8,
    num_points=EXPORTED_POINTS,
  )
