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


def stem_conv3x3(
  x: Array, features: int, name: str, kernel_init=torch_default_kernel_init
) -> Array:
  """The stem of x (N, H, W, C_in): ``conv3x3(features, 1, STEM_DTYPE,
  name)``, or for a single-channel input ``SingleChannelConv3x3``, with the
  same parameter. Call it inside a parent's ``nn.compact`` method."""
  if x.shape[-1] == 1:
    return SingleChannelConv3x3(features, kernel_init, name=name)(x)
  return conv3x3(features, 1, STEM_DTYPE, name, kernel_init)(x)


class SingleChannelConv3x3(nn.Module):
  """``conv3x3(features, 1, STEM_DTYPE, name)`` of a single-channel input.

  The same parameter ("kernel", (3, 3, 1, features), drawn from the same
  key) and the same outputs, computed as the sum of the input's nine
  shifted copies, each times one row of the kernel: XLA:CPU runs a C_in = 1
  convolution 3-6x slower than that sum (batch 128, 28x28, 8-64 output
  channels: forward 2.2-3.1 ms vs 0.3-1.0 ms), and the convolution was a
  fifth of a width-8 ResNet-10's forward pass (``benchmarks/README.md``,
  "AutoAttack side by side").

  Attributes:
    features: output channels.
    kernel_init: the kernel's initialiser.
  """

  features: int
  kernel_init: Callable[..., Array] = torch_default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(N, H, W, 1) -> (N, H, W, features), in x's and the kernel's
    promoted dtype (``STEM_DTYPE`` None: the input's precision)."""
    kernel = self.param("kernel", self.kernel_init, (3, 3, 1, self.features))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=STEM_DTYPE)
    return _single_channel_conv3x3(x, kernel)


def _nine_shifts(x: Array) -> Array:
  """(N, H, W, 1) -> (N, H, W, 9): the 3x3 neighbourhood of every pixel
  (zero-padded), row by row."""
  _, height, width, _ = x.shape
  padded = jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
  return jnp.stack(
    [
      padded[:, i : i + height, j : j + width]
      for i in range(3)
      for j in range(3)
    ],
    axis=-1,
  )


@jax.custom_jvp
def _single_channel_conv3x3(x: Array, kernel: Array) -> Array:
  """The stride-1, pad-1 3x3 convolution of x (N, H, W, 1) with kernel
  (3, 3, 1, F): (N, H, W, F), as a sum of nine scaled shifted copies."""
  _, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(
    padded[:, i : i + height, j : j + width] * kernel[i, j, 0]
    for i in range(3)
    for j in range(3)
  )


@_single_channel_conv3x3.defjvp
def _single_channel_conv3x3_jvp(primals, tangents):
  """The tangent as products with the (N, H, W, 9) neighbourhoods, whose
  transposes XLA:CPU runs fast: the input gradient of a 28x28 stem with 8
  channels at batch 56 takes 0.7 ms, against 2.4 ms through the
  convolution and 3.5 ms through the shifted sum's own transpose (batch
  128, 16 channels: 1.1, 5.1 and 25 ms); the kernel gradient costs what
  the convolution's does."""
  x, kernel = primals
  x_dot, kernel_dot = tangents
  flat = lambda k: k.reshape(9, -1)  # noqa: E731
  tangent = _nine_shifts(x_dot) @ flat(kernel) + _nine_shifts(x) @ flat(
    kernel_dot
  )
  return _single_channel_conv3x3(x, kernel), tangent


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
