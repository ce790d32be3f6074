"""Per-example ranks of the true class, and accuracies computed from them.

The evaluation keeps, for every example and every head (final head first,
then each probe), the rank of the true class among the K logits: 0 when the
head's top-1 is right, < k when its top-k contains the label. Ties rank the
lower class index first, as ``argmax`` does. From ranks:

- top-k accuracy is ``mean(rank < k)``;
- the per-example worst case over several attack runs is the largest rank:
  an example counts as robust at top-k only if every run leaves it in top-k.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TOP_K = (1, 2, 3)


def true_class_ranks(
  final_logits: Array, probe_logits: Sequence[Array], labels: Array
) -> Array:
  """Rank of the label under each head: int32 (N, 1 + num_probes).

  Column 0 is the final head, column 1 + l the probe l. A head whose
  logits are not all finite gets rank K (wrong at every k): a NaN must never
  count as a correct, robust prediction.
  """
  heads = jnp.stack([final_logits, *probe_logits], axis=1)  # (N, H, K)
  num_classes = heads.shape[-1]
  true_logit = jnp.take_along_axis(
    heads, labels[:, None, None].astype(jnp.int32), axis=-1
  )  # (N, H, 1)
  lower_index = jnp.arange(num_classes) < labels[:, None, None]  # (N, 1, K)
  beats_label = (heads > true_logit) | ((heads == true_logit) & lower_index)
  ranks = jnp.sum(beats_label, axis=-1, dtype=jnp.int32)
  return jnp.where(jnp.all(jnp.isfinite(heads), axis=-1), ranks, num_classes)


def worst_case(ranks: Sequence[np.ndarray]) -> np.ndarray:
  """Per-example (and per-head) worst case of several runs' ranks."""
  return np.max(np.stack(ranks), axis=0)


def top_k_accuracy(ranks: np.ndarray, k: int = 1) -> float:
  """Percentage of examples whose rank (N,) is below k."""
  return 100.0 * float(np.mean(ranks < k))


def per_class_accuracy(
  ranks: np.ndarray, labels: np.ndarray, num_classes: int
) -> list[float | None]:
  """Top-1 percentage per class from ranks (N,); None for an absent class."""
  return [
    top_k_accuracy(ranks[labels == c]) if np.any(labels == c) else None
    for c in range(num_classes)
  ]
