"""Backbones with and without CIFS / CAS: sizes, shapes, modes, devices."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import models
from cifs_jax.models import layers

CIFAR = (32, 32, 3)
FMNIST = (28, 28, 1)


def model_config(name, defense, **overrides):
  config = models.default_config()
  config.name = name
  config.defense = defense
  config.update(overrides)
  return config


def param_count(model, image_shape):
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)))
  )
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


# Probe sizes: MLP = C*h + h + h*K + K, linear = C*K + K (K = 10).
MLP = lambda c, h: c * h + h + h * 10 + 10
LINEAR = lambda c: c * 10 + 10


@pytest.mark.parametrize(
  "name,image_shape,vanilla,cifs_extra,cas_extra",
  [
    # Standard counts: CIFAR ResNet-18 11.17 M, WRN-28-10 36.48 M.
    (
      "resnet18",
      CIFAR,
      11_173_962,
      MLP(512, 128) + LINEAR(512),
      2 * LINEAR(512),
    ),
    (
      "wrn28_10",
      CIFAR,
      36_479_194,
      MLP(640, 240) + LINEAR(640),
      2 * LINEAR(640),
    ),
    (
      "resnet10",
      FMNIST,
      4_902_090,
      MLP(256, 128) + LINEAR(512),
      LINEAR(256) + LINEAR(512),
    ),
  ],
)
def test_parameter_counts(name, image_shape, vanilla, cifs_extra, cas_extra):
  count = lambda defense: param_count(
    models.build_model(model_config(name, defense)), image_shape
  )
  assert count("none") == vanilla
  assert count("cifs") == vanilla + cifs_extra
  assert count("cas") == vanilla + cas_extra


def tiny(name, defense, **overrides):
  """Narrow versions of the backbones for compiled tests on CPU."""
  width = {"resnet18": 4, "resnet10": 4, "wrn28_10": 1}[name]
  return models.build_model(
    model_config(name, defense, width=width, **overrides)
  )


@pytest.mark.parametrize(
  "name,image_shape,defense,num_probes",
  [
    ("resnet18", CIFAR, "none", 0),
    ("resnet18", CIFAR, "cifs", 2),
    ("resnet18", CIFAR, "cas", 2),
    ("resnet10", FMNIST, "cifs", 2),
  ],
)
def test_shapes_and_modes_compile(name, image_shape, defense, num_probes):
  model = tiny(name, defense)
  images = jax.random.uniform(jax.random.key(0), (4, *image_shape))
  labels = jnp.array([0, 1, 2, 3])
  variables = jax.jit(model.init)(jax.random.key(1), images)
  eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train_fn = jax.jit(
    lambda v, x, y: model.apply(
      v, x, train=True, labels=y, mutable=["batch_stats"]
    )
  )
  logits, probes = eval_fn(variables, images)
  (train_logits, train_probes), updates = train_fn(variables, images, labels)
  assert logits.shape == train_logits.shape == (4, 10)
  assert len(probes) == len(train_probes) == num_probes
  assert all(p.shape == (4, 10) for p in probes + train_probes)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(train_logits))
  # Training mode uses batch statistics and updates the running ones.
  assert not np.allclose(logits, train_logits)
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b),
    updates["batch_stats"],
    variables["batch_stats"],
  )
  assert all(jax.tree.leaves(changed))


def test_wide_resnet_placement_and_compilation():
  """The authors' WRN points exist in WRN-28-10; a WRN-10-1 compiles."""
  model = models.build_model(model_config("wrn28_10", "cifs"))
  assert model.defense.layers == ("block3.3", "final")
  assert set(model.defense.layers) <= set(model.insertion_points())
  small = models.WideResNet(
    depth=10,
    widen_factor=1,
    defense=models.Defense(
      kind="cifs",
      layers=("block3.0", "final"),
      probes=("mlp", "linear"),
      mlp_hidden=16,
    ),
  )
  images = jax.random.uniform(jax.random.key(0), (2, *CIFAR))
  variables = jax.jit(small.init)(jax.random.key(1), images)
  assert set(variables["params"]["block3_0"]) >= {"cifs_block3_0"}
  assert "cifs_final" in variables["params"]
  (logits, probes), _ = jax.jit(
    lambda v, x: small.apply(
      v, x, train=True, labels=jnp.array([1, 2]), mutable=["batch_stats"]
    )
  )(variables, images)
  assert logits.shape == (2, 10) and len(probes) == 2


def test_cas_reweights_by_class_weights():
  layer = models.CAS(num_classes=5)
  features = jax.random.uniform(jax.random.key(0), (3, 2, 2, 6))
  labels = jnp.array([4, 0, 2])
  variables = layer.init(jax.random.key(1), features)
  kernel = variables["params"]["classifier"]["kernel"]  # (C, K)
  masked, logits = layer.apply(variables, features, labels=labels, train=True)
  np.testing.assert_allclose(
    logits,
    features.mean((1, 2)) @ kernel + variables["params"]["classifier"]["bias"],
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    masked, features * kernel.T[labels][:, None, None, :], rtol=1e-6
  )
  masked_eval, _ = layer.apply(variables, features, labels=labels)
  predicted = jnp.argmax(logits, axis=-1)
  np.testing.assert_allclose(
    masked_eval, features * kernel.T[predicted][:, None, None, :], rtol=1e-6
  )


@pytest.mark.slow  # test_cifs_layer checks the same on an MLP by default.
def test_full_relevance_grad_of_model_matches_finite_differences(x64):
  model = models.build_model(model_config("resnet10", "cifs", width=4))
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1), jnp.float64)
  variables = model.init(jax.random.key(1), images)
  weights = jax.random.normal(jax.random.key(2), (2, 10), jnp.float64)

  def output(model):
    return lambda x: jnp.sum(model.apply(variables, x)[0] * weights)

  full = models.with_relevance_grad(model, "full")
  assert full.defense.cifs.relevance_grad == "full"
  direction = jax.random.normal(jax.random.key(3), images.shape, jnp.float64)
  eps = 1e-6
  finite_difference = (
    output(model)(images + eps * direction)
    - output(model)(images - eps * direction)
  ) / (2 * eps)
  full_derivative = jnp.vdot(jax.grad(output(full))(images), direction)
  stop_derivative = jnp.vdot(jax.grad(output(model))(images), direction)
  np.testing.assert_allclose(full_derivative, finite_difference, rtol=1e-6)
  assert abs(stop_derivative - finite_difference) > 100 * abs(
    full_derivative - finite_difference
  )


@pytest.mark.slow  # test_train_step checks whole training steps by default.
def test_pmap_matches_single_device():
  assert jax.local_device_count() == 2, "conftest sets two CPU devices"
  model = tiny("resnet18", "cifs")
  synced = model.clone(bn_axis_name="batch")
  images = jax.random.uniform(jax.random.key(0), (8, *CIFAR))
  labels = jnp.arange(8) % 10
  variables = model.init(jax.random.key(1), images)
  replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
  shard = lambda a: a.reshape(2, 4, *a.shape[1:])

  single_eval = model.apply(variables, images)
  pmap_eval = jax.pmap(lambda v, x: model.apply(v, x))(
    replicated, shard(images)
  )
  jax.tree.map(
    lambda s, p: np.testing.assert_allclose(
      s, p.reshape(s.shape), rtol=1e-5, atol=1e-6
    ),
    single_eval,
    pmap_eval,
  )

  single_train, single_state = model.apply(
    variables, images, train=True, labels=labels, mutable=["batch_stats"]
  )
  pmap_train, pmap_state = jax.pmap(
    lambda v, x, y: synced.apply(
      v, x, train=True, labels=y, mutable=["batch_stats"]
    ),
    axis_name="batch",
  )(replicated, shard(images), shard(labels))
  jax.tree.map(
    lambda s, p: np.testing.assert_allclose(
      s, p.reshape(s.shape), rtol=1e-4, atol=1e-5
    ),
    single_train,
    pmap_train,
  )
  jax.tree.map(
    lambda s, p: np.testing.assert_allclose(s, p[0], rtol=1e-4, atol=1e-6),
    single_state,
    pmap_state,
  )
  jax.tree.map(lambda p: np.testing.assert_array_equal(p[0], p[1]), pmap_state)


# ~28 s: the bf16 stem test covers half precision in the default run.
@pytest.mark.slow
def test_half_precision_keeps_float32_parameters_and_computes_in_bf16():
  """bf16 convolutions: float32 parameters and logits, bfloat16 feature maps,
  and logits of size O(1) within bf16's relative precision of float32's."""
  config = model_config("resnet18", "cifs", width=8)
  half = models.build_model(config, dtype=jnp.bfloat16)
  full = jax.jit(models.build_model(config).apply)
  images = jax.random.uniform(jax.random.key(0), (4, *CIFAR))
  variables = half.init(jax.random.key(1), images)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  # The masked features are tiny and the head's bias would dominate the
  # logits: drop the bias and scale the head so the logits have std 3.
  head = variables["params"]["linear"]
  head["bias"] = jnp.zeros_like(head["bias"])
  head["kernel"] *= 3 / np.std(full(variables, images)[0])
  (logits, probes), state = jax.jit(
    lambda v, x: half.apply(
      v, x, capture_intermediates=True, mutable=["intermediates"]
    )
  )(variables, images)
  assert logits.dtype == jnp.float32 and probes[0].dtype == jnp.float32
  conv_output = state["intermediates"]["layer4_0"]["conv1"]["__call__"][0]
  assert conv_output.dtype == jnp.bfloat16
  full_logits = full(variables, images)[0]
  assert np.std(full_logits) == pytest.approx(3, rel=1e-3)
  relative_error = np.linalg.norm(logits - full_logits) / np.linalg.norm(
    full_logits
  )
  # bf16 keeps 8 significant bits (2 ** -8 = 0.4 %); float32 keeps 24.
  assert 1e-4 < relative_error < 0.03


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="model.name='resnet50'"):
    models.build_model(model_config("resnet50", "cifs"))
  with pytest.raises(ValueError, match="model.defense='cifs2'"):
    models.build_model(model_config("resnet18", "cifs2"))
  config = model_config("resnet18", "cifs")
  config.cifs.unlock()
  config.cifs.top_k = 3
  with pytest.raises(KeyError, match="model.cifs.top_k"):
    models.build_model(config)
  bad_layer = model_config("resnet18", "cifs")
  bad_layer.cifs.layers = ("layer5.0", "layer4.1")
  model = models.build_model(bad_layer)
  with pytest.raises(ValueError, match="layer5.0"):
    model.init(jax.random.key(0), jnp.zeros((1, *CIFAR)))
  with pytest.raises(ValueError, match="one probe per layer"):
    dataclasses.replace(model.defense, probes=("mlp",))


@pytest.mark.parametrize(
  "name", ["resnet10", pytest.param("wrn28_10", marks=pytest.mark.slow)]
)
def test_half_precision_stem_keeps_steps_below_the_bfloat16_grid(name):
  # Pixels > 0.5 on bfloat16's 1/256 grid; a 0.4/255 step is below half
  # that spacing, so casting the input to bfloat16 would undo it exactly.
  width = 1 if name == "wrn28_10" else 4
  model = models.build_model(
    model_config(name, "cifs", width=width), dtype=jnp.bfloat16
  )
  grid = jax.random.randint(jax.random.key(0), (2, *CIFAR), 129, 255) / 256
  sign = jnp.sign(jax.random.normal(jax.random.key(1), grid.shape))
  stepped = grid + 0.4 / 255 * sign
  assert jnp.all(stepped.astype(jnp.bfloat16) == grid.astype(jnp.bfloat16))
  variables = model.init(jax.random.key(2), grid)
  apply = jax.jit(model.apply)
  assert not np.array_equal(
    apply(variables, grid)[0], apply(variables, stepped)[0]
  )


def test_the_single_channel_stem_is_nn_conv_with_its_parameter_and_outputs():
  """``layers.SingleChannelConv3x3`` (a shifted sum) against flax's
  ``nn.Conv`` with the same key: the same kernel, outputs, input and kernel
  gradients, and forward-mode derivative (its custom JVP)."""
  x = jnp.asarray(
    np.random.default_rng(0).uniform(size=(3, 9, 7, 1)), jnp.float32
  )
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 9, 7, 5)))
  reference = layers.conv3x3(5, 1, layers.STEM_DTYPE, "conv1")
  stem = layers.SingleChannelConv3x3(5)
  variables = reference.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(variables, stem.init(jax.random.key(0), x))

  def derivatives(module):
    def loss(variables, x):
      return jnp.sum(jnp.tanh(module.apply(variables, x)) * weights)

    tangent = jnp.ones_like(x)
    return (
      module.apply(variables, x),
      jax.grad(loss, argnums=(0, 1))(variables, x),
      jax.jvp(lambda x: module.apply(variables, x), (x,), (tangent,))[1],
    )

  chex.assert_trees_all_close(
    derivatives(stem), derivatives(reference), atol=1e-5, rtol=1e-5
  )
