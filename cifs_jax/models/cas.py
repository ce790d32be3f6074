"""CAS: channel-wise activation suppressing (Bai et al., ICLR 2021).

The baseline the paper compares CIFS with, as its authors' released code
defines it: an auxiliary classifier on the globally averaged features gives
logits q (N, K); the features are multiplied channel-wise by that classifier's
weight vector of the true class (training mode) or of argmax q (inference
mode). The weights are used as they are (they may be negative) and the loss
reaches them through the mask. Train with CE + beta * mean CE_l (beta = 2):
``losses.joint_loss_per_example(..., beta, scale=1 + beta)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifs_jax.models import layers

Array = jax.Array


class CAS(nn.Module):
  """Channel-wise activation suppressing layer.

  Attributes:
    num_classes: K, the auxiliary classifier's number of logits.
    zero_bias: start the classifier's bias at zero (the authors' WRN code)
      instead of PyTorch's default uniform init (their ResNet code).
  """

  num_classes: int
  zero_bias: bool = False

  @nn.compact
  def __call__(
    self, features: Array, labels: Array | None = None, train: bool = False
  ) -> tuple[Array, Array]:
    """(N, H, W, C) features -> (reweighted features, auxiliary logits (N, K)).

    ``labels`` (N,) are required in training mode and ignored otherwise.
    """
    classifier = layers.torch_linear(
      self.num_classes,
      features.shape[-1],
      name="classifier",
      zero_bias=self.zero_bias,
    )
    compute_dtype = jnp.promote_types(features.dtype, jnp.float32)
    logits = classifier(
      layers.global_average_pool(features.astype(compute_dtype))
    )
    if train:
      if labels is None:
        raise ValueError(
          "CAS in training mode needs the labels; pass "
          "labels=... or train=False."
        )
      classes = labels
    else:
      classes = jnp.argmax(logits, axis=-1)
    # jnp: the kernel may be a numpy array (variables given as numpy), which
    # cannot be indexed by traced classes.
    kernel = jnp.asarray(classifier.variables["params"]["kernel"])
    class_weights = kernel.T[classes]
    masked = features * class_weights[:, None, None, :].astype(features.dtype)
    return masked, logits
