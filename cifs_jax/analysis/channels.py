"""Channel statistics of the paper's Section 3.1 (Figures 1 and 3).

For the examples of one class, each channel of a layer's output is
summarised by

* its mean magnitude: the absolute value of the channel's spatial mean,
  averaged over the examples;
* its activation frequency: the fraction of the examples in which the
  channel's magnitude exceeds ``threshold`` (1 %) of the largest channel
  magnitude of that example ("counted via a threshold of 1 % of the largest
  magnitude among all channels", Section 3.1);

and the channels are listed in the descending order of the last linear
layer's weight for the class, the paper's x-axis.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Section 3.1: a channel is activated above 1 % of the largest magnitude.
FREQUENCY_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class ChannelStatistics:
  """One layer's channels for one class, in the order of the class weights.

  Attributes:
    order: (C,) channel indices, by descending class weight.
    weights: (C,) the class's weights of the last linear layer, in ``order``.
    magnitude: (C,) mean magnitude of each channel, in ``order``.
    frequency: (C,) activation frequency in [0, 1], in ``order``.
  """

  order: np.ndarray
  weights: np.ndarray
  magnitude: np.ndarray
  frequency: np.ndarray

  def as_dict(self) -> dict[str, list]:
    """The four arrays as lists (JSON)."""
    return {
      field.name: getattr(self, field.name).tolist()
      for field in dataclasses.fields(self)
    }


def channel_magnitudes(channel_means: np.ndarray) -> np.ndarray:
  """|spatial mean| of each channel: (N, C) -> (N, C)."""
  return np.abs(np.asarray(channel_means, np.float64))


def activation_frequency(
  magnitudes: np.ndarray, threshold: float = FREQUENCY_THRESHOLD
) -> np.ndarray:
  """Fraction of examples whose channel exceeds ``threshold`` times the
  example's largest channel magnitude: (N, C) -> (C,).

  An example whose channels are all zero activates none of them.
  """
  largest = magnitudes.max(axis=1, keepdims=True)
  activated = (magnitudes > threshold * largest) & (largest > 0)
  return activated.mean(axis=0)


def weight_order(class_weights: np.ndarray) -> np.ndarray:
  """Channel indices by descending weight (ties: lower index first), (C,)."""
  return np.argsort(-np.asarray(class_weights), kind="stable")


def class_channel_statistics(
  channel_means: np.ndarray,
  class_weights: np.ndarray,
  threshold: float = FREQUENCY_THRESHOLD,
) -> ChannelStatistics:
  """The statistics of Figures 1 and 3 for one class's examples.

  Args:
    channel_means: (N, C) spatial mean of each channel, one row per example
      of the class.
    class_weights: (C,) the last linear layer's weights of the class.
    threshold: the activation threshold, a fraction of each example's
      largest channel magnitude.

  Returns:
    ``ChannelStatistics`` with every array in descending weight order.
  """
  channel_means = np.asarray(channel_means)
  class_weights = np.asarray(class_weights, np.float64)
  if channel_means.ndim != 2 or channel_means.shape[1:] != class_weights.shape:
    raise ValueError(
      f"channel_means {channel_means.shape} must be (N, C) with C the length "
      f"of class_weights {class_weights.shape}."
    )
  magnitudes = channel_magnitudes(channel_means)
  order = weight_order(class_weights)
  return ChannelStatistics(
    order=order,
    weights=class_weights[order],
    magnitude=magnitudes.mean(axis=0)[order],
    frequency=activation_frequency(magnitudes, threshold)[order],
  )
