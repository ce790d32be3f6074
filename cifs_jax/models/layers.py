"""Small building blocks shared by the backbones, probes and CAS.

Initialisers follow PyTorch's defaults, since the authors' models are PyTorch
models initialised that way: ``nn.Conv2d``/``nn.Linear`` weights are
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), biases
likewise with the layer's fan_in.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# PyTorch's default weight init for Conv2d and Linear: variance 1/(3 fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)

# The first convolution's computation dtype in every backbone: None, the
# input's own (float32), also under bfloat16 mixed precision. Casting the
# input to bfloat16 first would round x + delta to a 1/256 grid for pixels
# >= 0.5, coarser than PGD-20's 0.8/255 step, and small steps would vanish.
STEM_DTYPE = None


def torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default bias init of a layer with ``fan_in`` inputs."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(
  features: int, fan_in: int, name: str, zero_bias: bool = False
) -> nn.Dense:
  """``nn.Dense`` initialised as PyTorch's ``nn.Linear(fan_in, features)``."""
  bias_init = (
    nn.initializers.zeros if zero_bias else torch_default_bias_init(fan_in)
  )
  return nn.Dense(
    features,
    kernel_init=torch_default_kernel_init,
    bias_init=bias_init,
    name=name,
  )


def global_average_pool(features: Array) -> Array:
  """Mean over the spatial axes: (N, H, W, C) -> (N, C)."""
  return jnp.mean(features, axis=(1, 2))


def conv3x3(
  features: int,
  strides: int,
  dtype: Any,
  name: str,
  kernel_init=torch_default_kernel_init,
) -> nn.Conv:
  """3x3 convolution without bias, padded by 1 on every side as PyTorch does.

  Flax's "SAME" pads stride-2 convolutions asymmetrically (0, 1); explicit
  (1, 1) padding keeps the outputs identical to the PyTorch reference.
  """
  return nn.Conv(
    features,
    (3, 3),
    strides=(strides, strides),
    padding=((1, 1), (1, 1)),
    use_bias=False,
    dtype=dtype,
    kernel_init=kernel_init,
    name=name,
  )


def conv1x1(
  features: int,
  strides: int,
  dtype: Any,
  name: str,
  kernel_init=torch_default_kernel_init,
) -> nn.Conv:
  """1x1 projection convolution without bias (residual shortcuts)."""
  return nn.Conv(
    features,
    (1, 1),
    strides=(strides, strides),
    padding="VALID",
    use_bias=False,
    dtype=dtype,
    kernel_init=kernel_init,
    name=name,
  )


def batch_norm(
  train: bool, dtype: Any, axis_name: str | None, name: str
) -> nn.BatchNorm:
  """BatchNorm with PyTorch's constants (momentum 0.1, eps 1e-5).

  ``axis_name``: the pmap/shard_map axis over which batch statistics are
  averaged in training (synchronised batch norm); None for one device.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    axis_name=axis_name,
    name=name,
  )


def torch_softplus(
  x: Array, beta: float = 5.0, threshold: float = 20.0
) -> Array:
  """``torch.nn.Softplus(beta, threshold)``: softplus(beta x) / beta.

  Linear above ``beta * x > threshold``, exactly as PyTorch, so that the MLP
  probe reproduces the authors' numbers to float64 precision.
  """
  scaled = beta * x
  return jnp.where(scaled > threshold, x, jax.nn.softplus(scaled) / beta)
