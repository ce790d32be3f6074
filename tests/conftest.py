"""Test configuration: two fake CPU devices, quick compilation
(``compilations.TEST_XLA_FLAGS``, a session-wide compilation cache), float64
on demand, and the fixtures several test modules share."""

import functools

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import idx_files
from tests.compilations import set_test_xla_flags

# Must run before any JAX computation initialises the CPU backend.
jax.config.update("jax_num_cpu_devices", 2)
set_test_xla_flags()


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for the whole test session (its
  directory is yielded, for subprocesses: ``JAX_COMPILATION_CACHE_DIR``):
  a program compiled again (the same model in another test, a command run
  in a subprocess) is read back instead of compiled. It changes no result;
  ``tests/compilations.py`` counts a program read back as a compilation."""
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  previous = jax.config.values["jax_compilation_cache_dir"]
  jax.config.update("jax_compilation_cache_dir", directory)
  compilation_cache.reset_cache()
  yield directory
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory):
  """A directory of small synthetic Fashion-MNIST IDX files in Debian's
  layout (64 train, 32 test examples; see ``idx_files``), for the code that
  reads them to run without Debian's copy. Read it, do not change it."""
  return idx_files.write_tiny_fashion_mnist(
    tmp_path_factory.mktemp("fashion-mnist")
  )


# The trained MLP's inputs: 48 pixels in [0, 1].
MLP_IMAGE_SHAPE = (4, 4, 3)


@pytest.fixture(scope="session")
def trained_mlp():
  """A two-layer MLP (hidden 32) trained by 150 Adam steps on three Gaussian
  classes in [0, 1]^48, over 95 % accurate: a model attacks can hurt.

  Returns (logits_fn, sample): logits_fn(x (N, 4, 4, 3)) -> (logits (N, 3),
  []), and sample(key, n) -> (images (n, 4, 4, 3), labels (n,)).
  """
  num_classes, hidden = 3, 32
  dim = int(np.prod(MLP_IMAGE_SHAPE))
  keys = jax.random.split(jax.random.key(13), 4)
  means = jax.random.uniform(
    keys[0], (num_classes, dim), minval=0.3, maxval=0.7
  )

  def sample(key, n):
    label_key, noise_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (n,), 0, num_classes)
    noise = 0.08 * jax.random.normal(noise_key, (n, dim))
    images = jnp.clip(means[labels] + noise, 0, 1)
    return images.reshape((n,) + MLP_IMAGE_SHAPE), labels

  def apply(params, x):
    flat = x.reshape(x.shape[0], -1)
    hidden_units = jax.nn.relu(flat @ params["w1"] + params["b1"])
    return hidden_units @ params["w2"] + params["b2"], []

  params = {
    "w1": jax.random.normal(keys[1], (dim, hidden)) / np.sqrt(dim),
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(keys[2], (hidden, num_classes)) / 6,
    "b2": jnp.zeros(num_classes),
  }
  optimizer = optax.adam(1e-2)

  def train(carry, key):
    params, opt_state = carry
    images, labels = sample(key, 128)
    grads = jax.grad(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, images)[0], labels
      ).mean()
    )(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.jit(
    lambda p, keys: jax.lax.scan(train, (p, optimizer.init(p)), keys)
  )(params, jax.random.split(keys[3], 150))
  return functools.partial(apply, params), sample


# Points of the exported model's test set (the official cross-check's >= 300).
EXPORTED_POINTS = 300


@pytest.fixture(scope="session")
def exported_resnet10(tmp_path_factory):
  """(JAX logits_fn, PyTorch model, x (300, 28, 28, 1), y (300,)) of a
  width-8 ResNet-10 trained on real Fashion-MNIST and exported to PyTorch
  (tests/exported_resnet10.py), shared by the PyTorch cross-checks."""
  pytest.importorskip("torch")
  from tests import exported_resnet10  # noqa: PLC0415 (needs torch)

  if not idx_files.HAS_FASHION_MNIST:
    pytest.skip(idx_files.NO_FASHION_MNIST)
  return exported_resnet10.train_and_export(
    tmp_path_factory.mktemp("fmnist_vanilla"),
    width=8,
    num_points=EXPORTED_POINTS,
  )
