"""The results dict of an evaluation, from per-example true-class ranks.

Accuracies are percentages of the valid examples. Layout::

  protocol:      the protocol's settings (attacks, betas, gradient modes)
  num_examples, num_classes, num_probes, class_names
  natural:       heads summary on clean inputs
  attacks:       {attack name: {
                   label, settings,
                   runs:         [{name, beta_atk, probe, gradient, top1, top2,
                                   top3, probes_top1}, ...]  one per run
                   per_beta:     {"0": top1, ..., "inf/probe0": top1}
                                 worst case over gradient modes, per target
                   min_over_beta: the lowest per_beta value: the paper's
                                 comparator (its "worst robust accuracy"
                                 over separate attacks, one per beta_atk
                                 target), weaker than worst_case
                   per_gradient: {"stop": top1, "full": top1}
                                 worst case over targets, per gradient mode
                   worst_case:   heads summary of the per-example worst case
                                 over all runs of the attack
                   table5:       {attack point: {output head: top1}}}}
  worst_case:    heads summary of the worst case over every run of every attack
  min_over_beta: the lowest min_over_beta of the attacks
  run:           what was evaluated (dataset, model, checkpoint, ...), added
                 by ``runs.evaluation.evaluate_and_publish``
  stages:        {"clean": top1, attack name: top1, ...}: the final head's
                 top-1 after each attack in protocol order, per example the
                 worst case over the clean input and every run so far
                 (AutoAttack's "robust accuracy after each stage")

A heads summary is {top1, top2, top3, per_class (top-1 per class), probes_top1
(top-1 of each probe's own prediction)}; top-k and per-class read the final
head. Table 5's attack points are "final" (beta_atk = 0), "probes"
(beta_atk = inf, all probes), "probe<l>" (beta_atk = inf, probe l alone) and
"adaptive" (every run); its output heads are "final" and "probe<l>".
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from cifs_jax.evaluation import metrics
from cifs_jax.evaluation.protocols import Protocol, beta_label


def summarize(
  protocol: Protocol,
  runs: Sequence,
  *,
  labels: np.ndarray,
  clean_ranks: np.ndarray,
  run_ranks: Mapping[str, np.ndarray],
  num_classes: int,
  class_names: Sequence[str] | None = None,
) -> dict:
  """The results dict (module docstring) of an evaluation.

  Args:
    protocol: the protocol evaluated.
    runs: its runs (``evaluator.Run``: attack, beta, probe, gradient, name).
    labels: (N,) labels of the valid examples.
    clean_ranks: (N, 1 + P) true-class ranks on clean inputs.
    run_ranks: run name -> (N, 1 + P) true-class ranks under that run.
    num_classes: K.
    class_names: K names, or None.
  """
  num_probes = clean_ranks.shape[1] - 1

  def heads(ranks):
    return _heads_summary(ranks, labels, num_classes)

  def worst(selected):
    return metrics.worst_case([run_ranks[run.name] for run in selected])

  attacks = {}
  for attack in protocol.attacks:
    attack_runs = [run for run in runs if run.attack.name == attack.name]
    per_beta = _top1_by(
      attack_runs, worst, lambda run: beta_label(run.beta, run.probe)
    )
    attacks[attack.name] = {
      "label": attack.label,
      "settings": attack.settings(),
      "runs": [_run_entry(run, run_ranks[run.name]) for run in attack_runs],
      "per_beta": per_beta,
      "min_over_beta": min(per_beta.values()),
      "per_gradient": _top1_by(attack_runs, worst, lambda run: run.gradient),
      "worst_case": heads(worst(attack_runs)),
      "table5": _table5(attack_runs, worst, num_probes),
    }
  return {
    "protocol": protocol.settings(),
    "num_examples": int(labels.shape[0]),
    "num_classes": num_classes,
    "num_probes": num_probes,
    "class_names": list(class_names) if class_names else None,
    "natural": heads(clean_ranks),
    "attacks": attacks,
    "worst_case": heads(worst(runs)),
    "min_over_beta": min(a["min_over_beta"] for a in attacks.values()),
    "stages": _stages(protocol, runs, clean_ranks, run_ranks),
  }


def _stages(
  protocol: Protocol,
  runs: Sequence,
  clean_ranks: np.ndarray,
  run_ranks: Mapping[str, np.ndarray],
) -> dict:
  """Final-head top-1 after each attack: cumulative worst case, in order."""
  worst_so_far = clean_ranks[:, 0]
  stages = {"clean": metrics.top_k_accuracy(worst_so_far)}
  for attack in protocol.attacks:
    worst_so_far = metrics.worst_case(
      [worst_so_far]
      + [run_ranks[r.name][:, 0] for r in runs if r.attack.name == attack.name]
    )
    stages[attack.name] = metrics.top_k_accuracy(worst_so_far)
  return stages


def _accuracies(ranks: np.ndarray) -> dict:
  """Top-k of the final head and top-1 of each probe, from (N, 1 + P)."""
  return {
    **{
      f"top{k}": metrics.top_k_accuracy(ranks[:, 0], k) for k in metrics.TOP_K
    },
    "probes_top1": [
      metrics.top_k_accuracy(ranks[:, 1 + probe])
      for probe in range(ranks.shape[1] - 1)
    ],
  }


def _heads_summary(
  ranks: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict:
  """``_accuracies`` and the final head's top-1 per class."""
  return {
    **_accuracies(ranks),
    "per_class": metrics.per_class_accuracy(ranks[:, 0], labels, num_classes),
  }


def _run_entry(run, ranks: np.ndarray) -> dict:
  """One run's settings and accuracies."""
  return {
    "name": run.name,
    "beta_atk": beta_label(run.beta),
    "probe": run.probe,
    "gradient": run.gradient,
    **_accuracies(ranks),
  }


def _top1_by(runs: Sequence, worst: Callable, group: Callable) -> dict:
  """Final-head top-1 of the worst case within each group of runs."""
  groups: dict[str, list] = {}
  for run in runs:
    groups.setdefault(group(run), []).append(run)
  return {
    name: metrics.top_k_accuracy(worst(members)[:, 0])
    for name, members in groups.items()
  }


def _table5(runs: Sequence, worst: Callable, num_probes: int) -> dict:
  """{attack point: {output head: top-1}} (paper's Table 5, all probes)."""
  points = {
    "final": [run for run in runs if run.beta == 0],
    "probes": [
      run for run in runs if math.isinf(run.beta) and run.probe is None
    ],
    **{
      f"probe{probe}": [run for run in runs if run.probe == probe]
      for probe in range(num_probes)
    },
    "adaptive": list(runs),
  }
  outputs = ["final"] + [f"probe{probe}" for probe in range(num_probes)]
  return {
    point: dict(
      zip(
        outputs, (metrics.top_k_accuracy(column) for column in worst(members).T)
      )
    )
    for point, members in points.items()
    if members
  }
