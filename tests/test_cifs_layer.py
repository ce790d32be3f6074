"""The CIFS layer against the authors' numbers and independent computations."""

import pathlib

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifs_jax import models
from cifs_jax.models import cifs as cifs_lib

REFERENCE = np.load(
  pathlib.Path(__file__).parent / "data" / "cifs_module_reference.npz"
)
PROBE_NAMES = {"Probe.0.fc": "hidden", "Probe.1": "head"}


def nchw_to_nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def reference_params(kind):
  """Flax params of the reference probe (PyTorch Linear weights transposed)."""
  params = {}
  for torch_name, flax_name in PROBE_NAMES.items():
    key = f"{kind}/param/{torch_name}.weight"
    if key in REFERENCE:
      params[flax_name] = {
        "kernel": REFERENCE[key].T,
        "bias": REFERENCE[f"{kind}/param/{torch_name}.bias"],
      }
  return {"probe": params}


def reference_objective_weights(shape_nhwc):
  """w = linspace(-1, 1) in NCHW order, as the reference README states."""
  n, h, w, c = shape_nhwc
  return (
    jnp.linspace(-1.0, 1.0, n * h * w * c)
    .reshape(n, c, h, w)
    .transpose(0, 2, 3, 1)
  )


def assert_rel_close(actual, expected, rtol):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(np.max(np.abs(expected)), 1e-300)
  np.testing.assert_array_less(np.max(np.abs(actual - expected)) / scale, rtol)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reproduces_authors_module(x64, kind, mode):
  features = jnp.asarray(nchw_to_nhwc(REFERENCE[f"{kind}/feat_nchw"]))
  labels = jnp.asarray(REFERENCE[f"{kind}/y"])
  layer = models.CIFS(10, probe=kind)
  weights = reference_objective_weights(features.shape)
  train = mode == "train"

  def objective(params, features):
    masked, raw = layer.apply(
      {"params": params}, features, labels=labels, train=train
    )
    loss = jnp.sum(masked * weights) + jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(raw, labels)
    )
    return loss, (masked, raw)

  params = reference_params(kind)
  (loss, (masked, raw)), (grad_params, grad_features) = jax.value_and_grad(
    objective, argnums=(0, 1), has_aux=True
  )(params, features)
  prefix = f"{kind}/{mode}"
  assert masked.dtype == jnp.float64
  assert_rel_close(
    masked, nchw_to_nhwc(REFERENCE[f"{prefix}/masked_feat_nchw"]), 1e-9
  )
  assert_rel_close(
    sown(layer, params, features, labels, train)["mask"],
    REFERENCE[f"{prefix}/mask"],
    1e-9,
  )
  assert_rel_close(raw, REFERENCE[f"{prefix}/raw_logits"], 1e-9)
  assert_rel_close(loss, REFERENCE[f"{prefix}/objective"], 1e-9)
  assert_rel_close(
    grad_features, nchw_to_nhwc(REFERENCE[f"{prefix}/grad_feat_nchw"]), 1e-9
  )
  for torch_name, flax_name in PROBE_NAMES.items():
    key = f"{prefix}/grad/{torch_name}.weight"
    if key in REFERENCE:
      grads = grad_params["probe"][flax_name]
      assert_rel_close(grads["kernel"], REFERENCE[key].T, 1e-9)
      assert_rel_close(
        grads["bias"], REFERENCE[f"{prefix}/grad/{torch_name}.bias"], 1e-9
      )


def random_probe_setup(kind, key, shape=(3, 5, 4, 16), num_classes=7):
  features = jax.random.normal(key, shape, jnp.float64)
  layer = models.CIFS(num_classes, probe=kind, mlp_hidden=12)
  params = layer.init(jax.random.key(1), features)["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  return layer, params, features


def sown(layer, params, features, labels=None, train=False):
  """The relevance g and mask m (N, C) that the layer sows."""
  _, state = layer.apply(
    {"params": params},
    features,
    labels=labels,
    train=train,
    mutable=["intermediates"],
  )
  return {name: value[0] for name, value in state["intermediates"].items()}


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_relevance_matches_central_finite_differences(x64, kind):
  layer, params, features = random_probe_setup(kind, jax.random.key(0))
  probe = models.Probe(7, kind, 12)
  probe_params = {"params": params["probe"]}
  logits = probe.apply(probe_params, features)
  selected = jax.lax.top_k(logits, 2)[1]

  def selected_sum(delta):
    shifted = probe.apply(probe_params, features + delta[:, None, None, :])
    return jnp.take_along_axis(shifted, selected, axis=1).sum(axis=1)

  eps = 1e-6
  n, c = features.shape[0], features.shape[-1]
  finite_differences = np.zeros((n, c))
  for channel in range(c):
    step = jnp.zeros((n, c)).at[:, channel].set(eps)
    finite_differences[:, channel] = (
      selected_sum(step) - selected_sum(-step)
    ) / (2 * eps)
  assert_rel_close(
    sown(layer, params, features)["relevance"], finite_differences, 1e-6
  )


@pytest.mark.parametrize("height,width", [(1, 1), (4, 4), (3, 7)])
def test_linear_probe_relevance_is_sum_of_selected_weight_columns(
  x64, height, width
):
  layer, params, features = random_probe_setup(
    "linear", jax.random.key(2), shape=(4, height, width, 16)
  )
  kernel = params["probe"]["head"]["kernel"]
  logits = models.Probe(7, "linear").apply(
    {"params": params["probe"]}, features
  )
  top2 = jax.lax.top_k(logits, 2)[1]
  expected = kernel[:, top2[:, 0]].T + kernel[:, top2[:, 1]].T
  np.testing.assert_allclose(
    sown(layer, params, features)["relevance"], expected, rtol=1e-12, atol=1e-14
  )


def test_label_substitution_cases():
  # Logits with a known order per example: class ranks 0 > 1 > 2 > ... .
  logits = jnp.array([[5.0, 4.0, 3.0, 2.0, 1.0]] * 4)
  labels = jnp.array([0, 1, 3, 4])
  reference = cifs_lib.relevance_class_weights(
    logits, labels, 2, True, "reference"
  )
  deduplicated = cifs_lib.relevance_class_weights(
    logits, labels, 2, True, "deduplicated"
  )
  inference = cifs_lib.relevance_class_weights(logits, labels, 2, False)
  np.testing.assert_array_equal(
    reference,
    [
      [1, 1, 0, 0, 0],  # label is top-1: label + 2nd
      [0, 2, 0, 0, 0],  # label is 2nd: the authors count it twice
      [0, 1, 0, 1, 0],  # label elsewhere: label + 2nd
      [0, 1, 0, 0, 1],
    ],
  )
  np.testing.assert_array_equal(
    deduplicated,
    [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]],
  )
  np.testing.assert_array_equal(inference, [[1, 1, 0, 0, 0]] * 4)
  top3 = cifs_lib.relevance_class_weights(logits, labels, 3, True, "reference")
  np.testing.assert_array_equal(top3[3], [0, 1, 1, 0, 1])


def test_training_mode_uses_the_label_and_inference_mode_ignores_it(x64):
  layer, params, features = random_probe_setup("mlp", jax.random.key(3))
  logits = models.Probe(7, "mlp", 12).apply(
    {"params": params["probe"]}, features
  )
  order = jnp.argsort(-logits, axis=1)
  last, first = order[:, -1], order[:, 0]
  apply = lambda labels, train: layer.apply(
    {"params": params}, features, labels=labels, train=train
  )[0]
  np.testing.assert_array_equal(apply(last, False), apply(first, False))
  np.testing.assert_array_equal(apply(None, False), apply(first, False))
  assert not np.allclose(apply(last, True), apply(first, True))
  # With the label as top-1 the training mask equals the inference mask.
  np.testing.assert_allclose(apply(first, True), apply(None, False))
  with pytest.raises(ValueError, match="needs the labels"):
    apply(None, True)


def test_importance_mask_functions():
  relevance = jnp.linspace(-3.0, 3.0, 13)[None, :]
  for imgf in cifs_lib.IMGFS:
    mask = cifs_lib.importance_mask(relevance, imgf)
    assert np.all(mask >= 0), imgf
    assert np.all(np.diff(mask[0]) >= 0), imgf  # monotone in g
    near_zero = cifs_lib.importance_mask(relevance / 30, imgf)
    assert np.all(np.diff(near_zero[0]) > 0), imgf  # strictly, unsaturated
  softmax = cifs_lib.importance_mask(relevance, "softmax", temperature=0.5)
  np.testing.assert_allclose(softmax.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    softmax, jax.nn.softmax(relevance / 0.5), rtol=1e-6
  )
  switch = cifs_lib.importance_mask(
    jnp.array([[-0.5, -0.1, 0.1, 0.5]]), "sigmoid", alpha=1000.0
  )
  np.testing.assert_allclose(switch, [[0, 0, 1, 1]], atol=1e-6)
  softplus = cifs_lib.importance_mask(relevance, "softplus", alpha=5.0)
  np.testing.assert_allclose(
    softplus, jnp.log1p(jnp.exp(5 * relevance)) / 5, rtol=1e-5
  )
  with pytest.raises(ValueError, match="imgf='relu'"):
    cifs_lib.importance_mask(relevance, "relu")


def test_mask_is_broadcast_over_space_only(x64):
  layer, params, features = random_probe_setup("mlp", jax.random.key(4))
  masked, _ = layer.apply({"params": params}, features)
  mask = sown(layer, params, features)["mask"]
  np.testing.assert_allclose(
    masked, features * mask[:, None, None, :], rtol=1e-6
  )
  assert np.ptp(np.asarray(mask), axis=-1).min() > 0


def directional_finite_difference(fn, x, direction, eps=1e-5):
  return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_full_relevance_grad_matches_finite_differences_stop_does_not(
  x64, kind
):
  features = jnp.asarray(nchw_to_nhwc(REFERENCE[f"{kind}/feat_nchw"]))
  weights = reference_objective_weights(features.shape)
  params = reference_params(kind)

  def output(relevance_grad):
    options = models.CIFSOptions(relevance_grad=relevance_grad)
    layer = models.CIFS(10, probe=kind, options=options)
    return lambda f: jnp.sum(layer.apply({"params": params}, f)[0] * weights)

  direction = jax.random.normal(jax.random.key(5), features.shape, jnp.float64)
  finite_difference = directional_finite_difference(
    output("full"), features, direction
  )
  full = jnp.vdot(jax.grad(output("full"))(features), direction)
  stop = jnp.vdot(jax.grad(output("stop"))(features), direction)
  np.testing.assert_allclose(full, finite_difference, rtol=1e-6)
  if kind == "linear":
    # A linear probe's relevance is a sum of weight columns: it does not
    # depend on the features (except through the discrete top-k), so both
    # gradients are exact.
    np.testing.assert_allclose(stop, full, rtol=1e-12)
  else:
    # The mask's own dependence on the features is small here (a softmax
    # over 512 channels) but far above the finite-difference error, and the
    # authors' gradient misses it.
    assert abs(stop - finite_difference) > 100 * abs(full - finite_difference)
  # "stop" is the authors' gradient (eval mode, objective without the CE).
  ref_grad = nchw_to_nhwc(REFERENCE[f"{kind}/eval/grad_feat_nchw"])
  stop_grad = jax.grad(output("stop"))(features)
  raw_ce_grad = jax.grad(
    lambda f: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
        models.Probe(10, kind).apply({"params": params["probe"]}, f),
        jnp.asarray(REFERENCE[f"{kind}/y"]),
      )
    )
  )(features)
  assert_rel_close(stop_grad + raw_ce_grad, ref_grad, 1e-9)


def test_loss_reaches_probe_params_through_the_mask_not_the_features(x64):
  layer, params, features = random_probe_setup("mlp", jax.random.key(6))
  weights = jax.random.normal(jax.random.key(7), features.shape, jnp.float64)
  labels = jnp.array([0, 3, 5])

  def masked_objective(params, features):
    # Only the masked features: the probe's parameters are reached only
    # through the relevance g (second order).
    masked, _ = layer.apply(
      {"params": params}, features, labels=labels, train=True
    )
    return jnp.sum(masked * weights)

  grad_params, grad_features = jax.grad(masked_objective, (0, 1))(
    params, features
  )
  # The second-order path exists and is right: finite differences in the
  # probe's parameters agree with it.
  flat_params, unravel = ravel_pytree(params)
  direction = jax.random.normal(
    jax.random.key(8), flat_params.shape, jnp.float64
  )
  fd = directional_finite_difference(
    lambda p: masked_objective(unravel(p), features), flat_params, direction
  )
  analytic = jnp.vdot(ravel_pytree(grad_params)[0], direction)
  assert abs(analytic) > 1e-6
  np.testing.assert_allclose(analytic, fd, rtol=1e-6)
  # No gradient reaches the features through g: d/dz sum(z * m * w) = m * w.
  mask = sown(layer, params, features, labels, True)["mask"]
  np.testing.assert_allclose(
    grad_features, mask[:, None, None, :] * weights, rtol=1e-9
  )


def test_jit_compiles_and_matches_eager():
  layer = models.CIFS(10, probe="mlp")
  features = jax.random.normal(jax.random.key(9), (4, 2, 2, 32))
  labels = jnp.arange(4)
  variables = layer.init(jax.random.key(0), features)
  for train in (False, True):
    eager = layer.apply(variables, features, labels=labels, train=train)
    jitted = jax.jit(
      lambda v, f, y, t=train: layer.apply(v, f, labels=y, train=t)
    )(variables, features, labels)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      eager,
      jitted,
    )


def test_bad_options_raise_clear_errors():
  features = jnp.ones((2, 2, 2, 8))
  with pytest.raises(ValueError, match="probe='conv'"):
    models.CIFS(10, probe="conv").init(jax.random.key(0), features)
  with pytest.raises(ValueError, match="relevance_grad='partial'"):
    models.CIFSOptions(relevance_grad="partial")
  with pytest.raises(ValueError, match="topk=11"):
    models.CIFS(10, options=models.CIFSOptions(topk=11)).init(
      jax.random.key(0), features
    )


@pytest.mark.parametrize("train", [False, True])
def test_mask_scale_multiplies_the_masked_features_and_nothing_else(train):
  """model.cifs.mask_scale = 2 doubles the mask and the masked features,
  exactly (a power of two); the probe logits and relevances do not move."""
  features = jax.random.normal(jax.random.key(0), (3, 2, 2, 6))
  labels = jnp.array([0, 3, 1])
  plain = models.CIFS(4, probe="mlp", mlp_hidden=5)
  doubled = models.CIFS(
    4, probe="mlp", mlp_hidden=5, options=models.CIFSOptions(mask_scale=2.0)
  )
  variables = plain.init(jax.random.key(1), features)

  def run(layer):
    return layer.apply(
      variables, features, labels, train, mutable=["intermediates"]
    )

  (masked, logits), sown = run(plain)
  (masked2, logits2), sown2 = run(doubled)
  np.testing.assert_array_equal(masked2, 2 * masked)
  np.testing.assert_array_equal(logits2, logits)
  mask = sown["intermediates"]["mask"][0]
  np.testing.assert_array_equal(sown2["intermediates"]["mask"][0], 2 * mask)
  np.testing.assert_allclose(mask.sum(-1), 1, rtol=1e-6)  # softmax
  np.testing.assert_array_equal(
    sown2["intermediates"]["relevance"][0],
    sown["intermediates"]["relevance"][0],
  )
  np.testing.assert_allclose(masked, features * mask[:, None, None, :])
