"""Converts the authors' PyTorch CIFS ResNets to Flax variables.

Supports ``ResNet18_L4`` and ``ResNet_Gray_10`` of HanshuYAN/CIFS
(``models/nets/resnet_CIFS.py``), so that their trained weights can be
evaluated under this project's attacks. Build the matching model with
``build_model`` (name "resnet18" or "resnet10", defense "cifs", the default
placement) and, to be safe, pass its ``init`` variables as ``template``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

# Torch module path -> Flax module path, tried in order.
_MODULE_RULES = (
    # CIFS inside a ResNet-18 block: layer4.{b}.Probe.Probe.{0.fc | 1}.
    (r"^layer(\d)\.(\d+)\.Probe\.Probe\.0\.fc$", r"cifs_layer\1_\2/probe/hidden"),
    (r"^layer(\d)\.(\d+)\.Probe\.Probe\.1$", r"cifs_layer\1_\2/probe/head"),
    # CIFS after layer3 / layer4 of ResNet-10 (Probe_0, Probe_1).
    (r"^Probe_0\.Probe\.0\.fc$", "cifs_layer3_0/probe/hidden"),
    (r"^Probe_0\.Probe\.1$", "cifs_layer3_0/probe/head"),
    (r"^Probe_1\.Probe\.0\.fc$", "cifs_layer4_0/probe/hidden"),
    (r"^Probe_1\.Probe\.1$", "cifs_layer4_0/probe/head"),
    (r"^layer(\d)\.(\d+)\.shortcut\.0$", r"layer\1_\2/shortcut_conv"),
    (r"^layer(\d)\.(\d+)\.shortcut\.1$", r"layer\1_\2/shortcut_bn"),
    (r"^layer(\d)\.(\d+)\.(conv\d|bn\d)$", r"layer\1_\2/\3"),
    (r"^(conv1|bn1|linear)$", r"\1"),
)


def _flax_module_path(torch_module: str) -> str:
  for pattern, replacement in _MODULE_RULES:
    if re.match(pattern, torch_module):
      return re.sub(pattern, replacement, torch_module)
  raise KeyError(f"State dict entry '{torch_module}.*' has no counterpart in "
                 "the Flax ResNet (expected the authors' ResNet18_L4 or "
                 "ResNet_Gray_10).")


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def convert_torch_state_dict(state_dict: Mapping[str, Any],
                             template: Mapping[str, Any] | None = None
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


def _check_matches(variables: Mapping[str, Any],
                   template: Mapping[str, Any]) -> None:
  """Raises ValueError listing every path whose presence or shape differs."""
  converted = flax.traverse_util.flatten_dict(variables, sep="/")
  expected = {
      path: np.shape(value) for path, value in
      flax.traverse_util.flatten_dict(dict(template), sep="/").items()
  }
  problems = [f"missing {p}" for p in expected if p not in converted]
  problems += [f"unexpected {p}" for p in converted if p not in expected]
  problems += [
      f"{p}: shape {converted[p].shape}, model expects {shape}"
      for p, shape in expected.items()
      if p in converted and converted[p].shape != shape
  ]
  if problems:
    raise ValueError("The state dict does not match the Flax model:\n  " +
                     "\n  ".join(problems))
