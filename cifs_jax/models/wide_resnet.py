"""Pre-activation WideResNet (WRN-28-10) with optional CIFS / CAS layers.

As the TRADES / CAS / CIFS code: 3x3 stem to 16 channels, three groups of
(depth - 4) / 6 pre-activation units with widths 16k, 32k, 64k (k the widen
factor) and strides 1, 2, 2, a final BN + ReLU, global average pooling and
Dense(K). Convolutions start from He-normal (fan_out) weights, Dense biases at
zero, as in that code. Dropout is 0 (the authors' setting) and not modelled.

Insertion points for a defence: "block{g}.{u}" is unit u's pre-activated
input (after its BN + ReLU, before its first convolution) of group g
(counted from 1 and 0); the unit's shortcut still adds its un-normalised
input when widths match. "final" is the output of the final BN + ReLU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifs_jax.models import layers
from cifs_jax.models.defense import Defense, apply_defense

Array = jax.Array

he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class WideBasicUnit(nn.Module):
  """Pre-activation unit: BN-ReLU-conv-BN-ReLU-conv plus shortcut.

  When the widths differ, the shortcut is a 1x1 convolution of the
  pre-activated input, as in the reference WRN.
  """

  features: int
  strides: int
  point: str
  num_classes: int
  defense: Defense
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: Array, train: bool, labels: Array | None, probe_logits: list[Array]
  ) -> Array:
    norm = lambda name: layers.batch_norm(
      train, self.dtype, self.bn_axis_name, name
    )
    conv = lambda strides, name: layers.conv3x3(
      self.features, strides, self.dtype, name, kernel_init=he_normal_fan_out
    )
    activated = nn.relu(norm("bn1")(x))
    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = layers.conv1x1(
        self.features,
        self.strides,
        self.dtype,
        "shortcut_conv",
        kernel_init=he_normal_fan_out,
      )(activated)
    activated = apply_defense(
      self.defense,
      self.point,
      self.num_classes,
      activated,
      labels,
      train,
      probe_logits,
    )
    y = conv(self.strides, "conv1")(activated)
    y = nn.relu(norm("bn2")(y))
    y = conv(1, "conv2")(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-widen returning (final logits, [probe logits per layer]).

  Attributes are as ``ResNet``'s, with ``depth`` (28) and ``widen_factor``
  (10) instead of the stage sizes and width.
  """

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  defense: Defense = Defense()
  dtype: Any = None
  bn_axis_name: str | None = None

  @property
  def units_per_group(self) -> int:
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}.")
    return (self.depth - 4) // 6

  def insertion_points(self) -> tuple[str, ...]:
    """Names of the places where a defence layer can sit, in forward order."""
    return tuple(
      f"block{g}.{u}" for g in (1, 2, 3) for u in range(self.units_per_group)
    ) + ("final",)

  @nn.compact
  def __call__(
    self, x: Array, train: bool = False, labels: Array | None = None
  ) -> tuple[Array, list[Array]]:
    """Same contract as ``ResNet.__call__``."""
    self.defense.check_layers(self.insertion_points())
    # The stem computes in the input's precision (layers.STEM_DTYPE).
    y = layers.stem_conv3x3(x, 16, "conv1", he_normal_fan_out)
    probe_logits: list[Array] = []
    for group, width in enumerate((16, 32, 64), start=1):
      for unit in range(self.units_per_group):
        strides = 2 if group > 1 and unit == 0 else 1
        y = WideBasicUnit(
          width * self.widen_factor,
          strides,
          f"block{group}.{unit}",
          self.num_classes,
          self.defense,
          self.dtype,
          self.bn_axis_name,
          name=f"block{group}_{unit}",
        )(y, train, labels, probe_logits)
    y = nn.relu(
      layers.batch_norm(train, self.dtype, self.bn_axis_name, "bn_final")(y)
    )
    y = apply_defense(
      self.defense, "final", self.num_classes, y, labels, train, probe_logits
    )
    y = layers.global_average_pool(
      y.astype(jnp.promote_types(y.dtype, jnp.float32))
    )
    # The penultimate features (N, C) for analysis (Figures 1 and 3).
    self.sow("intermediates", "penultimate", y)
    logits = layers.torch_linear(
      self.num_classes, y.shape[-1], name="fc", zero_bias=True
    )(y)
    return logits, probe_logits
