"""convert_torch_state_dict and its inverse, export_torch_state_dict: the
authors' PyTorch model and ours agree."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import models

torch = pytest.importorskip(
  "torch", reason="requirements-test.txt installs torch (CPU) for this test"
)
from tests import torch_reference  # noqa: E402


def randomised_torch_model(seed=0):
  """ResNet18 with CIFS, random weights and random batch-norm statistics."""
  torch.manual_seed(seed)
  model = torch_reference.ResNet18CIFS().double()
  randomise_batch_norms(model)
  return model


@pytest.fixture(scope="module")
def converted():
  torch_model = randomised_torch_model()
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert "layer4.0.Probe.Probe.0.fc.weight" in state_dict
  flax_model = models.build_model(models.default_config())
  with jax.enable_x64(True):
    template = jax.eval_shape(
      lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
  variables = models.convert_torch_state_dict(state_dict, template=template)
  return torch_model, flax_model, variables


@pytest.mark.parametrize(
  "train", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_same_outputs_as_the_pytorch_model(x64, converted, train):
  torch_model, flax_model, variables = converted
  images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3))
  num_probes = assert_same_outputs(
    torch_model, flax_model, variables, images, train
  )
  assert num_probes == 2


def test_layout_of_converted_arrays(converted):
  torch_model, _, variables = converted
  conv = torch_model.layer2[0].conv1.weight.detach().numpy()
  kernel = variables["params"]["layer2_0"]["conv1"]["kernel"]
  np.testing.assert_array_equal(kernel[1, 2, 5, 7], conv[7, 5, 1, 2])
  head = torch_model.layer4[1].Probe.Probe[1].weight.detach().numpy()
  np.testing.assert_array_equal(
    variables["params"]["cifs_layer4_1"]["probe"]["head"]["kernel"], head.T
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["bn1"]["var"], torch_model.bn1.running_var.numpy()
  )


def test_mismatched_state_dict_is_refused(converted):
  torch_model, flax_model, _ = converted
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  template = jax.eval_shape(
    lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  )
  del state_dict["linear.bias"]
  with pytest.raises(ValueError, match="missing params/linear/bias"):
    models.convert_torch_state_dict(state_dict, template=template)
  state_dict["fc.weight"] = np.zeros((10, 512))
  with pytest.raises(KeyError, match="fc"):
    models.convert_torch_state_dict(state_dict)


def randomised_flax_variables(name, width=None, seed=0):
  """Random float32 variables of a CIFS model, shaped by ``eval_shape``:
  kernels with fan-in scaling, batch-norm scales and variances around 1."""
  config = models.default_config()
  config.name, config.width = name, width
  channels = 3 if name == "resnet18" else 1
  shapes = jax.eval_shape(
    lambda: models.build_model(config).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, channels))
    )
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    field = path[-1].key
    if field == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif field in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.uniform(-0.2, 0.2, leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_export_inverts_convert_exactly():
  torch_model = randomised_torch_model(seed=1)
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  exported = models.export_torch_state_dict(
    models.convert_torch_state_dict(state_dict)
  )
  assert list(exported) == list(state_dict)  # same names, same order
  for name, value in state_dict.items():
    assert exported[name].dtype == value.dtype, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


@pytest.mark.parametrize("name", ["resnet18", "resnet10"])
def test_convert_inverts_export_exactly(name):
  variables = randomised_flax_variables(name, width=8)
  exported = models.export_torch_state_dict(variables, backbone=name)
  if name == "resnet10":
    assert "Probe_1.Probe.1.weight" in exported
  converted = models.convert_torch_state_dict(exported, template=variables)
  chex.assert_trees_all_equal(converted, variables)
  chex.assert_trees_all_equal_dtypes(converted, variables)


def test_pytorch_model_loads_exported_weights_and_agrees(x64):
  variables = jax.tree.map(
    lambda v: np.asarray(v, np.float64), randomised_flax_variables("resnet18")
  )
  torch_model = torch_reference.ResNet18CIFS().double().eval()
  torch_model.load_state_dict(
    {
      k: torch.from_numpy(v)
      for k, v in models.export_torch_state_dict(variables).items()
    },
    strict=True,
  )
  images = np.random.default_rng(1).uniform(0, 1, (4, 32, 32, 3))
  torch_logits, torch_probes = torch_model(
    torch.from_numpy(images.transpose(0, 3, 1, 2))
  )
  apply = jax.jit(models.build_model(models.default_config()).apply)
  logits, probes = apply(variables, jnp.asarray(images))
  chex.assert_trees_all_close(
    (logits, *probes),
    tuple(t.detach().numpy() for t in (torch_logits, *torch_probes)),
    rtol=1e-9,
    atol=1e-9,
  )


def test_export_refuses_unknown_modules_and_backbones():
  variables = {"params": {"fc": {"kernel": np.zeros((4, 2))}}}
  with pytest.raises(KeyError, match="fc"):
    models.export_torch_state_dict(variables)
  with pytest.raises(ValueError, match="backbone"):
    models.export_torch_state_dict(variables, backbone="wrn28_10")


def randomise_batch_norms(torch_model):
  """Random affine parameters and running statistics, so that eval mode
  differs from train mode and from the identity."""
  with torch.no_grad():
    for module in torch_model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)


def assert_same_outputs(torch_model, flax_model, variables, images, train):
  """Final and probe logits of both models agree to float64 precision, in
  eval mode or in train mode (batch statistics, label substitution).
  Returns the number of probes."""
  labels = np.arange(len(images)) % 10
  torch_model.train(train)
  torch_logits, torch_probes = torch_model(
    torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(labels)
  )
  (logits, probes), _ = flax_model.apply(
    variables,
    jnp.asarray(images),
    train=train,
    labels=jnp.asarray(labels),
    mutable=["batch_stats"],
  )
  assert logits.dtype == jnp.float64 and len(probes) == len(torch_probes)
  chex.assert_trees_all_close(
    (logits, *probes),
    tuple(t.detach().numpy() for t in (torch_logits, *torch_probes)),
    rtol=1e-9,
    atol=1e-9,
  )
  return len(probes)


@pytest.mark.parametrize("train", [False, True])
def test_resnet10_matches_the_authors_resnet_gray_10(x64, train):
  """Our ResNet-10 (width 4), exported, loads into a PyTorch copy of
  ResNet_Gray_10 (CIFS after layer3 and layer4) and computes the same."""
  config = models.default_config()
  config.name, config.width = "resnet10", 4
  variables = jax.tree.map(
    lambda v: np.asarray(v, np.float64),
    randomised_flax_variables("resnet10", 4),
  )
  torch_model = torch_reference.ResNet10CIFS(width=4).double()
  torch_model.load_state_dict(
    {
      k: torch.from_numpy(v)
      for k, v in models.export_torch_state_dict(variables, "resnet10").items()
    },
    strict=True,
  )
  images = np.random.default_rng(2).uniform(0, 1, (4, 28, 28, 1))
  assert_same_outputs(
    torch_model, models.build_model(config), variables, images, train
  )


def wrn_flax_path(torch_module):
  """The Flax path of a module of ``torch_reference.WideResNetCIFS``."""
  renames = (
    (
      r"block(\d)\.(\d+)\.Probe\.Probe\.0\.fc",
      r"block\1_\2/cifs_block\1_\2/probe/hidden",
    ),
    (
      r"block(\d)\.(\d+)\.Probe\.Probe\.1",
      r"block\1_\2/cifs_block\1_\2/probe/head",
    ),
    (r"block(\d)\.(\d+)\.convShortcut", r"block\1_\2/shortcut_conv"),
    (r"block(\d)\.(\d+)\.(\w+)", r"block\1_\2/\3"),
    (r"Probe\.Probe\.1", "cifs_final/probe/head"),
    (r"bn1", "bn_final"),
    (r"(conv1|fc)", r"\1"),
  )
  for pattern, replacement in renames:
    if re.fullmatch(pattern, torch_module):
      return re.sub(pattern, replacement, torch_module)
  raise KeyError(torch_module)


def wrn_variables_from_torch(torch_model):
  """Flax variables of the WRN, each array from the PyTorch module that
  ``wrn_flax_path`` names."""
  variables = {"params": {}, "batch_stats": {}}

  def put(collection, path, value):
    tree = variables[collection]
    *parents, leaf = path.split("/")
    for key in parents:
      tree = tree.setdefault(key, {})
    tree[leaf] = value.detach().numpy()

  for name, module in torch_model.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      path = wrn_flax_path(name)
      put("params", f"{path}/scale", module.weight)
      put("params", f"{path}/bias", module.bias)
      put("batch_stats", f"{path}/mean", module.running_mean)
      put("batch_stats", f"{path}/var", module.running_var)
    elif isinstance(module, torch.nn.Conv2d):
      put(
        "params",
        f"{wrn_flax_path(name)}/kernel",
        module.weight.permute(2, 3, 1, 0),
      )
    elif isinstance(module, torch.nn.Linear):
      put("params", f"{wrn_flax_path(name)}/kernel", module.weight.T)
      put("params", f"{wrn_flax_path(name)}/bias", module.bias)
  return variables


def authors_wrn16():
  """``build_model``'s CIFS WRN-28-10 shrunk to WRN-16-1: the same probes,
  MLP width and bias init, CIFS in group 3's last unit (block3.1 of 2)."""
  config = models.default_config()
  config.name, config.width = "wrn28_10", 1
  model = models.build_model(config)
  assert model.defense.layers == ("block3.3", "final")
  defense = dataclasses.replace(model.defense, layers=("block3.1", "final"))
  return model.clone(depth=16, defense=defense)


@pytest.mark.parametrize("train", [False, True])
def test_wide_resnet_matches_the_authors_cifs_placement(x64, train):
  """A WRN-16-1 with the authors' placement (CIFS on the pre-activated input
  of group 3's last unit, MLP hidden 240; and after the final BN + ReLU,
  linear) computes what a PyTorch copy of their WRN computes."""
  torch.manual_seed(0)
  torch_model = torch_reference.WideResNetCIFS(depth=16, widen=1).double()
  randomise_batch_norms(torch_model)
  with torch.no_grad():  # Non-zero probe and classifier biases.
    for module in torch_model.modules():
      if isinstance(module, torch.nn.Linear):
        module.bias.uniform_(-0.2, 0.2)
  flax_model = authors_wrn16()
  variables = wrn_variables_from_torch(torch_model)
  template = jax.eval_shape(
    lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  )
  chex.assert_trees_all_equal_shapes(
    variables, jax.tree.map(lambda s: np.zeros(s.shape), template)
  )
  images = np.random.default_rng(3).uniform(0, 1, (4, 32, 32, 3))
  assert_same_outputs(torch_model, flax_model, variables, images, train)


def test_wide_resnet_probes_start_with_zero_biases():
  """The authors' WRN initialises probe and classifier biases at zero."""
  model = authors_wrn16()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[
    "params"
  ]
  mlp = params["block3_1"]["cifs_block3_1"]["probe"]
  assert mlp["hidden"]["kernel"].shape == (64, 240)
  biases = (
    mlp["hidden"]["bias"],
    mlp["head"]["bias"],
    params["cifs_final"]["probe"]["head"]["bias"],
    params["fc"]["bias"],
  )
  assert all(np.all(b == 0) for b in biases)
