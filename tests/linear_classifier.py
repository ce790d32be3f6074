"""A linear classifier f(x) = W x + b with closed-form attack answers.

Shared by the FAB and Square tests: for a linear model the least L-inf /
L-2 distance to the boundary between classes y and t is
``(f_y - f_t) / ||w_y - w_t||_1`` / ``... / ||w_y - w_t||_2`` when the [0, 1]
box does not bind, and whether an L-inf ball (intersected with the box)
holds an adversarial point is decided coordinate by coordinate.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (jit)
class LinearClassifier:
  """weight (K, D), bias (K,); inputs (N, ...) with D values each."""

  weight: np.ndarray
  bias: np.ndarray

  def logits(self, x):
    """(N, ...) -> (N, K), in jnp (traceable) or numpy."""
    flat = x.reshape(x.shape[0], -1)
    return flat @ self.weight.T + self.bias

  def logits_fn(self, x):
    """The attacks' interface: (final logits, no probes)."""
    return self.logits(x), []

  def boundary_distances(self, x, y, targets, norm):
    """(N, T): least distance from x to {f_t >= f_y} for targets (N, T).

    Ignores the box; see ``closest_boundary_points``.
    """
    flat = np.asarray(x).reshape(x.shape[0], -1)
    normal, margin = self._normals_and_margins(flat, y, targets)
    order = 1 if norm == "linf" else 2
    return margin / np.linalg.norm(normal, ord=order, axis=-1)

  def closest_boundary_points(self, x, y, targets, norm):
    """(N, T, D): the minimisers of ``boundary_distances`` (no box)."""
    flat = np.asarray(x).reshape(x.shape[0], -1)
    normal, margin = self._normals_and_margins(flat, y, targets)
    if norm == "linf":
      step = np.sign(normal) * (margin / np.abs(normal).sum(-1))[..., None]
    else:
      step = normal * (margin / np.square(normal).sum(-1))[..., None]
    return flat[:, None, :] - step

  def linf_robust(self, x, y, eps):
    """(N,) bool: no point of the eps-ball within [0, 1] is misclassified
    (exact, ties f_u = f_y counting as misclassified)."""
    flat = np.asarray(x).reshape(x.shape[0], -1)
    low, high = np.maximum(flat - eps, 0.0), np.minimum(flat + eps, 1.0)
    # Per other class u, the largest f_u - f_y over the box-ball.
    normal = self.weight[None] - self.weight[y][:, None]  # (N, K, D)
    worst = (
      np.maximum(normal * low[:, None], normal * high[:, None]).sum(-1)
      + self.bias[None]
      - self.bias[y][:, None]
    )
    worst[np.arange(len(y)), y] = -np.inf
    return worst.max(-1) < 0

  def _normals_and_margins(self, flat, y, targets):
    """w_y - w_t (N, T, D) and f_y - f_t (N, T)."""
    normal = self.weight[y][:, None] - self.weight[targets]
    logits = self.logits(flat)
    rows = np.arange(len(y))[:, None]
    return normal, logits[rows, y[:, None]] - logits[rows, targets]


def random_classifier(seed, num_classes, dim, scale=1.0):
  """Gaussian weights and biases (a numpy model: jnp inputs give jnp)."""
  rng = np.random.default_rng(seed)
  return LinearClassifier(
    scale * rng.normal(size=(num_classes, dim)),
    0.1 * rng.normal(size=num_classes),
  )


def correctly_labelled_points(model, seed, shape, low=0.0, high=1.0):
  """Uniform inputs of ``shape`` and their predicted labels (numpy)."""
  x = np.random.default_rng(seed).uniform(low, high, shape)
  return x, np.argmax(model.logits(x), axis=-1)
