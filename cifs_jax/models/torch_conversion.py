"""Converts the authors' PyTorch CIFS ResNets to Flax variables and back.

Supports ``ResNet18_L4`` and ``ResNet_Gray_10`` of HanshuYAN/CIFS
(``models/nets/resnet_CIFS.py``), so that their trained weights can be
evaluated under this project's attacks. Build the matching model with
``build_model`` (name "resnet18" or "resnet10", defense "cifs", the default
placement) and, to be safe, pass its ``init`` variables as ``template``.
``export_torch_state_dict`` is the inverse: a model trained here, as a state
dict the authors' PyTorch code loads.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

# Module names: (PyTorch, Flax) templates; {stage} is one digit, {block} a
# block index, {unit} a conv or batch-norm of a block, {top} a network-level
# module. Backbone-specific pairs come first: the two CIFS placements name
# "cifs_layer4_0" differently.
_CIFS_RULES = {
  # CIFS inside a ResNet-18 block: layer4.{b}.Probe.Probe.{0.fc | 1}.
  "resnet18": (
    (
      "layer{stage}.{block}.Probe.Probe.0.fc",
      "cifs_layer{stage}_{block}/probe/hidden",
    ),
    (
      "layer{stage}.{block}.Probe.Probe.1",
      "cifs_layer{stage}_{block}/probe/head",
    ),
  ),
  # CIFS after layer3 / layer4 of ResNet-10 (Probe_0, Probe_1).
  "resnet10": (
    ("Probe_0.Probe.0.fc", "cifs_layer3_0/probe/hidden"),
    ("Probe_0.Probe.1", "cifs_layer3_0/probe/head"),
    ("Probe_1.Probe.0.fc", "cifs_layer4_0/probe/hidden"),
    ("Probe_1.Probe.1", "cifs_layer4_0/probe/head"),
  ),
}
_BACKBONE_RULES = (
  ("layer{stage}.{block}.shortcut.0", "layer{stage}_{block}/shortcut_conv"),
  ("layer{stage}.{block}.shortcut.1", "layer{stage}_{block}/shortcut_bn"),
  ("layer{stage}.{block}.{unit}", "layer{stage}_{block}/{unit}"),
  ("{top}", "{top}"),
)
_FIELDS = {
  "stage": r"\d",
  "block": r"\d+",
  "unit": r"conv\d|bn\d",
  "top": "conv1|bn1|linear",
}
BACKBONES = tuple(_CIFS_RULES)


def _template_regex(template: str) -> re.Pattern:
  """A template such as "layer{stage}_{block}" as a full-match regex."""
  parts = re.split(r"\{(\w+)\}", template)  # odd parts: field names
  return re.compile(
    "".join(
      f"(?P<{part}>{_FIELDS[part]})" if i % 2 else re.escape(part)
      for i, part in enumerate(parts)
    )
  )


def _rename(name: str, rules, source: int) -> str | None:
  """``name`` matched against side ``source`` (0 torch, 1 flax) of the
  rules, rewritten to the other side; None if no rule matches."""
  for rule in rules:
    match = _template_regex(rule[source]).fullmatch(name)
    if match:
      return rule[1 - source].format(**match.groupdict())
  return None


def _flax_module_path(torch_module: str) -> str:
  rules = sum(_CIFS_RULES.values(), ()) + _BACKBONE_RULES
  path = _rename(torch_module, rules, source=0)
  if path is None:
    raise KeyError(
      f"State dict entry '{torch_module}.*' has no counterpart "
      "in the Flax ResNet (expected the authors' ResNet18_L4 or "
      "ResNet_Gray_10)."
    )
  return path


def _torch_module_name(flax_path: str, backbone: str) -> str:
  name = _rename(flax_path, _CIFS_RULES[backbone] + _BACKBONE_RULES, source=1)
  if name is None:
    raise KeyError(
      f"Flax module '{flax_path}' has no counterpart in the "
      f"authors' {backbone} (ResNet18_L4 / ResNet_Gray_10)."
    )
  return name


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def convert_torch_state_dict(
  state_dict: Mapping[str, Any], template: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """PyTorch state dict of the authors' CIFS ResNet -> Flax variables.

  Args:
    state_dict: mapping from PyTorch names (e.g.
      "layer4.0.Probe.Probe.0.fc.weight") to arrays (numpy arrays or CPU
      tensors). Convolution weights are (O, I, kH, kW), Linear weights
      (out, in).
    template: optional variables of the Flax model (``model.init(...)``);
      if given, the result must have exactly its structure and shapes.

  Returns:
    {"params": ..., "batch_stats": ...} with numpy arrays in the state
    dict's dtype: convolution kernels (kH, kW, I, O), Dense kernels (in, out),
    batch-norm scale/bias in params and mean/var in batch_stats.
  """
  modules: dict[str, dict[str, np.ndarray]] = {}
  for name, value in state_dict.items():
    module, _, field = name.rpartition(".")
    modules.setdefault(module, {})[field] = np.asarray(value)
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for module, fields in modules.items():
    path = _flax_module_path(module)
    if "running_mean" in fields:  # BatchNorm2d
      _set(variables["params"], f"{path}/scale", fields["weight"])
      _set(variables["params"], f"{path}/bias", fields["bias"])
      _set(variables["batch_stats"], f"{path}/mean", fields["running_mean"])
      _set(variables["batch_stats"], f"{path}/var", fields["running_var"])
      continue
    weight = fields["weight"]
    if weight.ndim == 4:  # Conv2d: OIHW -> HWIO
      _set(variables["params"], f"{path}/kernel", weight.transpose(2, 3, 1, 0))
    else:  # Linear: (out, in) -> (in, out)
      _set(variables["params"], f"{path}/kernel", weight.T)
    if "bias" in fields:
      _set(variables["params"], f"{path}/bias", fields["bias"])
  if template is not None:
    _check_matches(variables, template)
  return variables


def export_torch_state_dict(
  variables: Mapping[str, Any], backbone: str = "resnet18"
) -> dict[str, np.ndarray]:
  """Flax variables -> a state dict of the authors' PyTorch model.

  The exact inverse of ``convert_torch_state_dict``: a model trained here
  loads into ResNet18_L4 ("resnet18") or ResNet_Gray_10 ("resnet10") with
  ``model.load_state_dict({k: torch.from_numpy(v) for k, v in ...})``.

  Args:
    variables: {"params": ..., "batch_stats": ...} of the Flax CIFS ResNet
      built with the authors' placement (``build_model``, defense "cifs").
    backbone: "resnet18" or "resnet10": which of the authors' models to
      name the entries after (their CIFS modules are named differently).

  Returns:
    PyTorch name -> numpy array (the variables' dtype, C-contiguous):
    convolution weights (O, I, kH, kW), Linear weights (out, in), and per
    BatchNorm2d weight, bias, running_mean, running_var and
    num_batches_tracked (int64 0: Flax does not count batches; PyTorch uses
    the count only for BatchNorm with momentum=None, which the authors do
    not use).
  """
  if backbone not in BACKBONES:
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}.")
  modules: dict[str, dict[str, np.ndarray]] = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(
      dict(variables.get(collection, {})), sep="/"
    )
    for path, value in flat.items():
      module, _, field = path.rpartition("/")
      modules.setdefault(module, {})[field] = np.asarray(value)
  state_dict = {}
  for module, fields in modules.items():
    name = _torch_module_name(module, backbone)
    if "mean" in fields:  # BatchNorm
      torch_fields = {
        "weight": fields["scale"],
        "bias": fields["bias"],
        "running_mean": fields["mean"],
        "running_var": fields["var"],
        "num_batches_tracked": np.array(0, np.int64),
      }
    else:  # Conv: HWIO -> OIHW; Dense: (in, out) -> (out, in)
      kernel = fields["kernel"]
      torch_fields = {
        "weight": kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
      }
      if "bias" in fields:
        torch_fields["bias"] = fields["bias"]
    for field, value in torch_fields.items():
      state_dict[f"{name}.{field}"] = np.ascontiguousarray(value)
  return state_dict


def _check_matches(
  variables: Mapping[str, Any], template: Mapping[str, Any]
) -> None:
  """Raises ValueError listing every path whose presence or shape differs."""
  converted = flax.traverse_util.flatten_dict(variables, sep="/")
  expected = {
    path: np.shape(value)
    for path, value in flax.traverse_util.flatten_dict(
      dict(template), sep="/"
    ).items()
  }
  problems = [f"missing {p}" for p in expected if p not in converted]
  problems += [f"unexpected {p}" for p in converted if p not in expected]
  problems += [
    f"{p}: shape {converted[p].shape}, model expects {shape}"
    for p, shape in expected.items()
    if p in converted and converted[p].shape != shape
  ]
  if problems:
    raise ValueError(
      "The state dict does not match the Flax model:\n  "
      + "\n  ".join(problems)
    )
