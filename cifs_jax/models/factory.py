"""Builds a backbone from the ``model`` section of a config.

The ``model`` section (``default_config()``):

  name: "resnet18" | "resnet10" | "wrn28_10"
  num_classes: K (10 for every dataset of the paper)
  width: ResNet: channels of the first stage (64); WRN: widen factor (10).
    None takes the architecture's standard value; smaller values give the
    small models of smoke tests.
  defense: "cifs" | "cas" | "none"
  cifs: layers, probes, mlp_hidden (None: the authors' placement for the
    backbone, see DEFAULT_PLACEMENT), and a key for each field of
    ``CIFSOptions`` (topk, imgf, ...)
  cas: layers (None: the same points as CIFS)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import flax.linen as nn
import ml_collections
from ml_collections import config_dict

from cifs_jax.models.cifs import CIFSOptions
from cifs_jax.models.defense import KINDS, Defense
from cifs_jax.models.resnet import ResNet
from cifs_jax.models.wide_resnet import WideResNet
from cifs_jax.validation import check_choice, check_known_keys

ARCHITECTURES = ("resnet18", "resnet10", "wrn28_10")


@dataclasses.dataclass(frozen=True)
class Placement:
  """The authors' defence layers for one backbone (docs/design.md §2)."""

  layers: tuple[str, ...]
  probes: tuple[str, ...]
  mlp_hidden: int


DEFAULT_PLACEMENT = {
  "resnet18": Placement(("layer4.0", "layer4.1"), ("mlp", "linear"), 128),
  "resnet10": Placement(("layer3.0", "layer4.0"), ("mlp", "linear"), 128),
  "wrn28_10": Placement(("block3.3", "final"), ("mlp", "linear"), 240),
}


def typed_placeholder(hint: Any) -> config_dict.FieldReference:
  """A None config value that the command line can set: its type is the
  annotation ``hint`` without None (``float | None`` -> float,
  ``tuple[str, ...]`` -> tuple)."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is (
    typing.Union
  ):
    (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
  return config_dict.placeholder(typing.get_origin(hint) or hint)


def _dataclass_config(cls: type, defaults: Any = None) -> dict[str, Any]:
  """The fields of dataclass ``cls`` as config values: those of the
  instance ``defaults``, a typed placeholder where a default is None (or
  every field, without ``defaults``)."""
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    value = None if defaults is None else getattr(defaults, field.name)
    values[field.name] = (
      typed_placeholder(hints[field.name]) if value is None else value
    )
  return values


def default_config() -> ml_collections.ConfigDict:
  """The ``model`` config section: CIFS ResNet-18 as in the paper.

  Keys whose default is None are typed placeholders, so that
  ``--config.model.width=16`` works on the command line.
  """
  return ml_collections.ConfigDict(
    {
      "name": "resnet18",
      "num_classes": 10,
      "width": config_dict.placeholder(int),
      "defense": "cifs",
      "cifs": {
        **_dataclass_config(Placement),
        **_dataclass_config(CIFSOptions, CIFSOptions()),
      },
      "cas": {
        "layers": typed_placeholder(typing.get_type_hints(Placement)["layers"]),
      },
    }
  )


def defense_from_config(config: ml_collections.ConfigDict) -> Defense:
  """The ``Defense`` a ``model`` config section asks for."""
  check_choice("model.defense", config.defense, KINDS)
  placement = DEFAULT_PLACEMENT[config.name]
  zero_bias = config.name.startswith("wrn")  # the authors' WRN init
  if config.defense == "none":
    return Defense()
  if config.defense == "cas":
    layers = config.cas.layers or placement.layers
    return Defense(kind="cas", layers=tuple(layers), zero_bias=zero_bias)
  cifs = config.cifs
  return Defense(
    kind="cifs",
    layers=tuple(cifs.layers or placement.layers),
    probes=tuple(cifs.probes or placement.probes),
    mlp_hidden=cifs.mlp_hidden or placement.mlp_hidden,
    zero_bias=zero_bias,
    cifs=cifs_options(config),
  )


def cifs_options(config: ml_collections.ConfigDict) -> CIFSOptions:
  """The ``CIFSOptions`` of a ``model`` section; ValueError naming the key
  (``model.cifs.<option>``) of a bad value."""
  try:
    options = CIFSOptions(
      **{
        field.name: config.cifs[field.name]
        for field in dataclasses.fields(CIFSOptions)
      }
    )
  except ValueError as e:
    raise ValueError(f"model.cifs.{e}") from e
  if options.topk > config.num_classes:
    raise ValueError(
      f"model.cifs.topk={options.topk} must be <= model.num_classes "
      f"({config.num_classes})."
    )
  return options


def build_model(
  config: ml_collections.ConfigDict,
  dtype: Any = None,
  bn_axis_name: str | None = None,
) -> nn.Module:
  """Builds the backbone of a ``model`` config section.

  Args:
    config: the ``model`` section (see ``default_config``).
    dtype: computation dtype (None: float32; jnp.bfloat16 for mixed
      precision).
    bn_axis_name: device axis name for synchronised batch norm, or None.

  Returns:
    A Flax module; ``module.apply(variables, x, train=..., labels=...)``
    returns (logits (N, K), [probe logits (N, K), ...]).
  """
  check_known_keys(config, default_config(), "model.")
  check_choice("model.name", config.name, ARCHITECTURES)
  if config.width is not None and config.width < 1:
    raise ValueError(
      f"model.width={config.width!r} must be >= 1 (None: the "
      "architecture's standard width)."
    )
  cifs_options(config)  # checked whatever the defence
  defense = defense_from_config(config)
  if config.name == "wrn28_10":
    return WideResNet(
      depth=28,
      widen_factor=10 if config.width is None else config.width,
      num_classes=config.num_classes,
      defense=defense,
      dtype=dtype,
      bn_axis_name=bn_axis_name,
    )
  stage_sizes = (2, 2, 2, 2) if config.name == "resnet18" else (1, 1, 1, 1)
  return ResNet(
    stage_sizes=stage_sizes,
    num_classes=config.num_classes,
    width=64 if config.width is None else config.width,
    defense=defense,
    dtype=dtype,
    bn_axis_name=bn_axis_name,
  )


def with_relevance_grad(model: nn.Module, relevance_grad: str) -> nn.Module:
  """A copy of ``model`` whose CIFS layers use ``relevance_grad``.

  "stop" is the authors' gradient (mask constant w.r.t. the input), "full"
  differentiates through the mask. Variables are shared unchanged. Models
  without CIFS are returned as they are.
  """
  if model.defense.kind != "cifs":
    return model
  options = dataclasses.replace(
    model.defense.cifs, relevance_grad=relevance_grad
  )
  return model.clone(defense=dataclasses.replace(model.defense, cifs=options))
