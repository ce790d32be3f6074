"""The figures, as PNG files (matplotlib's Agg backend: nothing interactive).

* ``plot_channel_panel``: Figures 1 and 3: per site (CIFS: before and after
  the mask; other models: penultimate features), the mean channel
  magnitudes (top), the class's weights of the last linear layer (middle)
  and the activation frequencies (bottom) of natural and adversarial
  examples, channels in descending weight order.
* ``plot_per_class_accuracy``: top-1 per class of one or more runs, bars.
* ``plot_training_curves``: Figure 4: training loss and per-epoch natural /
  PGD accuracy of one or more runs.

Every figure has a fixed size in pixels (``*_SIZE``, width x height).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifs_jax.analysis.channels import ChannelStatistics  # noqa: E402

DPI = 100
CHANNEL_PANEL_COLUMN_SIZE = (500, 750)  # one column per feature site
PER_CLASS_SIZE = (900, 450)
TRAINING_CURVES_SIZE = (1100, 450)
SITE_TITLES = {
  "before_mask": "last CIFS layer, before the mask",
  "after_mask": "last CIFS layer, after the mask",
  "penultimate": "penultimate layer",
}
INPUT_COLORS = {"natural": "tab:blue", "adversarial": "tab:red"}


def _figure(size: tuple[int, int], rows: int = 1, columns: int = 1):
  """A figure of ``size`` pixels (width, height) with a grid of axes."""
  figure, axes = plt.subplots(
    rows,
    columns,
    figsize=(size[0] / DPI, size[1] / DPI),
    dpi=DPI,
    squeeze=False,
  )
  return figure, axes


def _save(figure, path: str | os.PathLike) -> str:
  """Writes ``figure`` as a PNG of its exact pixel size and closes it."""
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  figure.savefig(path, dpi=DPI, format="png")
  plt.close(figure)
  return os.fspath(path)


def plot_channel_panel(
  statistics: Mapping[str, Mapping[str, ChannelStatistics]],
  title: str,
  path: str | os.PathLike,
) -> str:
  """Figures 1/3 for one class: a column per feature site.

  Args:
    statistics: {site: {"natural" | "adversarial": ChannelStatistics}}, the
      sites of ``features.feature_sites`` in plotting order.
    title: the figure's title (model, class, attack).
    path: the PNG to write.

  Returns:
    ``path``; the image is ``CHANNEL_PANEL_COLUMN_SIZE`` times the number
    of sites wide.
  """
  width, height = CHANNEL_PANEL_COLUMN_SIZE
  figure, axes = _figure((width * len(statistics), height), 3, len(statistics))
  for column, (site, by_input) in enumerate(statistics.items()):
    top, middle, bottom = axes[:, column]
    for name, stats in by_input.items():
      rank = np.arange(len(stats.order))
      color = INPUT_COLORS.get(name)
      top.plot(rank, stats.magnitude, color=color, lw=0.8, label=name)
      bottom.plot(rank, stats.frequency, color=color, lw=0.8, label=name)
    weights = next(iter(by_input.values())).weights
    middle.bar(np.arange(len(weights)), weights, width=1.0, color="tab:gray")
    top.set_title(SITE_TITLES.get(site, site), fontsize=10)
    top.set_ylabel("mean magnitude")
    middle.set_ylabel("class weight")
    bottom.set_ylabel("activation frequency")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("channel (descending class weight)")
    top.legend(fontsize=8)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  return _save(figure, path)


def plot_per_class_accuracy(
  accuracies: Mapping[str, Sequence[float]],
  class_names: Sequence[str],
  title: str,
  path: str | os.PathLike,
) -> str:
  """Grouped bars: top-1 (%) per class, one bar per run.

  Args:
    accuracies: {run label: K accuracies in %}.
    class_names: the K class names.
    title: the figure's title (which attack).
    path: the PNG to write (``PER_CLASS_SIZE`` pixels).
  """
  figure, axes = _figure(PER_CLASS_SIZE)
  ax = axes[0, 0]
  positions = np.arange(len(class_names))
  bar_width = 0.8 / max(len(accuracies), 1)
  for i, (label, values) in enumerate(accuracies.items()):
    ax.bar(
      positions + (i + 0.5) * bar_width - 0.4, values, bar_width, label=label
    )
  ax.set_xticks(positions, class_names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  figure.tight_layout()
  return _save(figure, path)


def plot_training_curves(
  curves: Mapping[str, Mapping[str, np.ndarray]],
  path: str | os.PathLike,
) -> str:
  """Figure 4: training loss (left) and per-epoch accuracies (right).

  Args:
    curves: {run label: ``runs.training_curves`` of the run}: "loss_epoch"
      and "loss" (the logged training loss at fractional epochs),
      "epoch", "natural_accuracy" and "pgd_accuracy" (%, per evaluated
      epoch).
    path: the PNG to write (``TRAINING_CURVES_SIZE`` pixels).
  """
  figure, axes = _figure(TRAINING_CURVES_SIZE, 1, 2)
  loss_ax, accuracy_ax = axes[0]
  for i, (label, curve) in enumerate(curves.items()):
    color = f"C{i}"
    loss_ax.plot(curve["loss_epoch"], curve["loss"], color=color, label=label)
    accuracy_ax.plot(
      curve["epoch"],
      curve["pgd_accuracy"],
      color=color,
      marker=".",
      label=f"{label}: PGD",
    )
    accuracy_ax.plot(
      curve["epoch"],
      curve["natural_accuracy"],
      color=color,
      ls="--",
      marker=".",
      label=f"{label}: natural",
    )
  loss_ax.set_xlabel("epoch")
  loss_ax.set_ylabel("training loss")
  loss_ax.legend(fontsize=8)
  accuracy_ax.set_xlabel("epoch")
  accuracy_ax.set_ylabel("test accuracy (%)")
  accuracy_ax.legend(fontsize=8)
  figure.tight_layout()
  return _save(figure, path)
