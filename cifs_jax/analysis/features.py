"""The channel features that Figures 1 and 3 plot, read from a model.

Backbones sow their penultimate features (the spatially averaged input of the
last linear layer) and CIFS layers sow the spatial means of their unmasked
channels and their mask into the "intermediates" collection; this module runs
a model in inference mode and returns them for the last CIFS layer, or, for
vanilla and CAS models, the penultimate features.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax

# The final linear layer of each backbone (``models.ResNet``: "linear",
# ``models.WideResNet``: "fc").
HEAD_NAMES = ("linear", "fc")
# The features of each site: CIFS models have the last CIFS layer's output
# before and after its mask; other models their penultimate features.
CIFS_SITES = ("before_mask", "after_mask")
PLAIN_SITES = ("penultimate",)


def feature_sites(model: nn.Module) -> tuple[str, ...]:
  """The sites ``channel_means`` returns for ``model``."""
  return CIFS_SITES if model.defense.kind == "cifs" else PLAIN_SITES


def classifier_kernel(variables: Mapping[str, Any]) -> jax.Array:
  """The last linear layer's weights, (C, K) (a column per class)."""
  params = variables["params"]
  for name in HEAD_NAMES:
    if name in params:
      return params[name]["kernel"]
  raise KeyError(
    f"No final linear layer among the top-level parameters "
    f"{sorted(params)}; expected one of {HEAD_NAMES}."
  )


def last_cifs_name(model: nn.Module) -> str:
  """The module name of the model's last CIFS layer (forward order)."""
  if model.defense.kind != "cifs":
    raise ValueError(
      f"The model has no CIFS layer (defense {model.defense.kind!r})."
    )
  return f"cifs_{model.defense.layers[-1].replace('.', '_')}"


def _find_module(tree: Mapping[str, Any], name: str) -> Mapping[str, Any]:
  """The sown values of the module ``name``, anywhere in ``tree``."""
  for key, value in _walk(tree):
    if key == name:
      return value
  raise KeyError(f"Nothing sown by a module named {name!r}.")


def _walk(tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    yield key, value
    if isinstance(value, Mapping):
      yield from _walk(value)


def channel_means(
  model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[str, jax.Array]:
  """Spatial mean of each channel at every site of ``feature_sites(model)``
  (traceable: jit it with ``model`` static).

  Args:
    model: a backbone of ``models.build_model``.
    variables: its variables.
    x: (N, H, W, C_in) images in [0, 1].

  Returns:
    {site: (N, C)}: "before_mask" / "after_mask" (the last CIFS layer's
    unmasked channel means, and those times the mask: the spatial means of
    its output), or "penultimate" (the input of the last linear layer).

  Raises:
    ValueError: the last CIFS layer does not have as many channels as the
      last linear layer has inputs (its channels cannot be sorted by the
      class weights).
  """
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  sown = state["intermediates"]
  if model.defense.kind != "cifs":
    return {"penultimate": sown["penultimate"][0]}
  cifs = _find_module(sown, last_cifs_name(model))
  before = cifs["channel_means"][0]
  fan_in = classifier_kernel(variables).shape[0]
  if before.shape[1] != fan_in:
    raise ValueError(
      f"The last CIFS layer ({model.defense.layers[-1]}) has "
      f"{before.shape[1]} channels but the last linear layer takes "
      f"{fan_in}: its channels cannot be sorted by the class weights."
    )
  return {
    "before_mask": before,
    "after_mask": before * cifs["mask"][0],
  }
