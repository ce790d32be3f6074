"""Which channel-selection defence a backbone uses, and where.

A backbone names its insertion points (e.g. "layer4.0" after the first block
of ResNet's last stage); ``Defense`` says which of them get a CIFS or CAS
layer and with which options. It is a frozen dataclass, so it can be a Flax
module attribute and be changed with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from cifs_jax.models.cas import CAS
from cifs_jax.models.cifs import CIFS, PROBES, CIFSOptions
from cifs_jax.validation import check_choice

KINDS = ("none", "cifs", "cas")


@dataclasses.dataclass(frozen=True)
class Defense:
  """Channel-selection layers of a backbone.

  Attributes:
    kind: "none" (vanilla), "cifs" or "cas".
    layers: the insertion points, in forward order (names the backbone
      defines; the backbone's ``insertion_points()`` lists them).
    probes: CIFS only: "linear" or "mlp", one per layer.
    mlp_hidden: hidden width of MLP probes (128; 240 on WRN-28-10).
    zero_bias: probe / auxiliary classifier biases start at zero (the
      authors' WRN code) instead of PyTorch's default init.
    cifs: the options shared by every CIFS layer of the model.
  """

  kind: str = "none"
  layers: tuple[str, ...] = ()
  probes: tuple[str, ...] = ()
  mlp_hidden: int = 128
  zero_bias: bool = False
  cifs: CIFSOptions = CIFSOptions()

  def __post_init__(self):
    check_choice("defense kind", self.kind, KINDS)
    if self.kind == "none" and self.layers:
      raise ValueError(
        "A vanilla model (kind='none') takes no defense "
        f"layers, got {self.layers}."
      )
    if self.kind == "cifs":
      if len(self.probes) != len(self.layers):
        raise ValueError(
          f"CIFS needs one probe per layer: layers="
          f"{self.layers}, probes={self.probes}."
        )
      for probe in self.probes:
        check_choice("probe", probe, PROBES)
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"Defense layers repeat: {self.layers}.")

  def check_layers(self, insertion_points: tuple[str, ...]) -> None:
    """Raises ValueError if a layer is not one of the backbone's points."""
    unknown = [p for p in self.layers if p not in insertion_points]
    if unknown:
      raise ValueError(
        f"Unknown defense layer(s) {unknown}; this backbone's "
        f"insertion points are {insertion_points}."
      )

  def module(self, point: str, num_classes: int) -> nn.Module | None:
    """The CIFS/CAS layer at insertion point ``point``, or None."""
    if point not in self.layers:
      return None
    name = f"{self.kind}_{point.replace('.', '_')}"
    if self.kind == "cas":
      return CAS(num_classes, zero_bias=self.zero_bias, name=name)
    return CIFS(
      num_classes,
      probe=self.probes[self.layers.index(point)],
      mlp_hidden=self.mlp_hidden,
      zero_bias=self.zero_bias,
      options=self.cifs,
      name=name,
    )


def apply_defense(
  defense: Defense,
  point: str,
  num_classes: int,
  features,
  labels,
  train: bool,
  probe_logits: list,
):
  """Applies the defence at ``point`` (if any); appends its logits.

  Returns the (possibly masked) features. ``probe_logits`` collects the
  probe / auxiliary logits in forward order.
  """
  layer = defense.module(point, num_classes)
  if layer is None:
    return features
  features, logits = layer(features, labels=labels, train=train)
  probe_logits.append(logits)
  return features
