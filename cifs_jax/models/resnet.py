"""CIFAR-style ResNets (ResNet-18, ResNet-10) with optional CIFS / CAS layers.

As the authors' code (and kuangliu's CIFAR ResNets): 3x3 stride-1 stem, no
max-pool, four stages of BasicBlocks with widths w, 2w, 4w, 8w (w = 64) and
strides 1, 2, 2, 2, global average pooling (the reference's 4x4 average pool
covers the whole 4x4 map for 32x32 and 28x28 inputs), then Dense(K).

Insertion points for a defence are "layer{s}.{b}": the output (after the
ReLU) of block b of stage s, both counted as in PyTorch (s from 1, b from 0).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifs_jax.models import layers
from cifs_jax.models.defense import Defense, apply_defense

Array = jax.Array


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU."""

  features: int
  strides: int
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm = lambda name: layers.batch_norm(
      train, self.dtype, self.bn_axis_name, name
    )
    y = layers.conv3x3(self.features, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = layers.conv3x3(self.features, 1, self.dtype, "conv2")(y)
    y = norm("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = layers.conv1x1(
        self.features, self.strides, self.dtype, "shortcut_conv"
      )(x)
      x = norm("shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """CIFAR ResNet returning (final logits, [probe logits per defence layer]).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    num_classes: K.
    width: channels of the first stage (64).
    defense: which CIFS/CAS layers to insert (default: none).
    dtype: computation dtype of convolutions and batch norm: None infers it
      from inputs and parameters (float32, or float64 under x64); bfloat16
      for mixed precision. Parameters and batch statistics stay float32,
      and the first convolution, the head and CIFS/CAS layers compute in
      at least float32.
    bn_axis_name: axis name for synchronised batch norm under pmap or
      shard_map (e.g. "batch"); None on one device.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 10
  width: int = 64
  defense: Defense = Defense()
  dtype: Any = None
  bn_axis_name: str | None = None

  def insertion_points(self) -> tuple[str, ...]:
    """Names of the places where a defence layer can sit, in forward order."""
    return tuple(
      f"layer{s + 1}.{b}"
      for s, size in enumerate(self.stage_sizes)
      for b in range(size)
    )

  @nn.compact
  def __call__(
    self, x: Array, train: bool = False, labels: Array | None = None
  ) -> tuple[Array, list[Array]]:
    """Classifies images.

    Args:
      x: (N, H, W, C_in) images in [0, 1] (no normalisation, as the
        reference).
      train: training mode (batch statistics, CIFS/CAS label substitution).
      labels: (N,) integer labels; needed in training mode by CIFS and CAS.

    Returns:
      (logits (N, K) in at least float32, list of (N, K) probe logits in
      forward order).
    """
    self.defense.check_layers(self.insertion_points())
    # The stem computes in the input's precision (layers.STEM_DTYPE).
    y = layers.stem_conv3x3(x, self.width, "conv1")
    y = nn.relu(
      layers.batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(y)
    )
    probe_logits: list[Array] = []
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        y = BasicBlock(
          self.width * 2**stage,
          strides,
          self.dtype,
          self.bn_axis_name,
          name=f"layer{stage + 1}_{block}",
        )(y, train)
        y = apply_defense(
          self.defense,
          f"layer{stage + 1}.{block}",
          self.num_classes,
          y,
          labels,
          train,
          probe_logits,
        )
    y = layers.global_average_pool(
      y.astype(jnp.promote_types(y.dtype, jnp.float32))
    )
    # The penultimate features (N, C) for analysis (Figures 1 and 3).
    self.sow("intermediates", "penultimate", y)
    logits = layers.torch_linear(self.num_classes, y.shape[-1], name="linear")(
      y
    )
    return logits, probe_logits
