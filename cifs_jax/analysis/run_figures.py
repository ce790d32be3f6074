"""The figures that compare runs: per-class accuracy and training curves.

Both read only a run's files (``runs``) and draw with ``plots``; the
``analyze`` and ``report`` commands share them.
"""

from __future__ import annotations

import os
from typing import Sequence

from cifs_jax.analysis import plots, runs


def per_class_figure(
  workdirs: Sequence[str | os.PathLike],
  attack: str,
  path: str | os.PathLike,
) -> str | None:
  """Top-1 per class under ``attack`` of each run's main evaluation report
  (``runs.main_report``); runs without it are left out. Returns the PNG's
  path, or None when no run has the numbers."""
  accuracies, class_names, sources = {}, None, []
  for workdir in workdirs:
    found = runs.main_report(runs.eval_reports(workdir))
    if found is None:
      continue
    name, results = found
    values = runs.per_class_top1(results, attack)
    if values is None:
      continue
    label = runs.run_label(workdir)
    accuracies[label] = values
    sources.append(f"{label}/{name}")
    class_names = results.get("class_names") or [
      str(c) for c in range(results["num_classes"])
    ]
  if not accuracies:
    return None
  title = f"top-1 per class, {attack} ({', '.join(sources)})"
  return plots.plot_per_class_accuracy(accuracies, class_names, title, path)


def training_curves_figure(
  workdirs: Sequence[str | os.PathLike], path: str | os.PathLike
) -> str:
  """Figure 4 for the runs (from their ``metrics.jsonl``)."""
  curves = {
    runs.run_label(workdir): runs.training_curves(runs.read_metrics(workdir))
    for workdir in workdirs
  }
  return plots.plot_training_curves(curves, path)
