"""What the analysis reads from a training run's directory.

``metrics.jsonl`` (``runs.metric_logging``: training rows with
``train_loss``, evaluation rows with ``epoch``, ``natural_accuracy`` and
``pgd_accuracy`` in %), the ``eval_*.json`` reports of
``evaluation.report`` and ``config.json``, found through
``runs.directory.RunDirectory``.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections
import numpy as np

from cifs_jax.evaluation import report
from cifs_jax.runs.directory import RunDirectory


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of ``metrics.jsonl`` by step; of rows repeated by a resumed
  run (same step and the same keys) the last one is kept."""
  path = pathlib.Path(RunDirectory(workdir).metrics_path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: not a training run?")
  rows = {}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {number}: {e}.") from e
    rows[(row["step"], frozenset(row))] = row
  return sorted(rows.values(), key=lambda row: row["step"])


def training_curves(rows: list[dict]) -> dict[str, np.ndarray]:
  """Figure 4's curves from ``read_metrics`` rows.

  Returns:
    {"loss_epoch", "loss"}: the logged training loss at fractional epochs
    (step / steps per epoch; the step itself when no epoch was evaluated);
    {"epoch", "natural_accuracy", "pgd_accuracy"}: one entry per evaluated
    epoch (accuracies in %).
  """
  evaluations = [row for row in rows if "epoch" in row]
  training = [row for row in rows if "train_loss" in row]
  steps_per_epoch = (
    evaluations[0]["step"] / evaluations[0]["epoch"] if evaluations else 1.0
  )
  column = lambda selected, key: np.array(
    [row[key] for row in selected], np.float64
  )
  return {
    "loss_epoch": column(training, "step") / steps_per_epoch,
    "loss": column(training, "train_loss"),
    "epoch": column(evaluations, "epoch"),
    "natural_accuracy": column(evaluations, "natural_accuracy"),
    "pgd_accuracy": column(evaluations, "pgd_accuracy"),
  }


def final_check(rows: list[dict]) -> dict[str, float] | None:
  """The trainer's final natural and PGD check from ``read_metrics`` rows
  (the last ``final_check/*`` row): {"natural_accuracy", "pgd_accuracy"}
  in % and "eval_examples"; None if the run has none (unfinished, or
  trained before the check was logged)."""
  prefix = "final_check/"
  checks = [row for row in rows if f"{prefix}pgd_accuracy" in row]
  if not checks:
    return None
  return {
    key[len(prefix) :]: value
    for key, value in checks[-1].items()
    if key.startswith(prefix)
  }


def _read_reports(workdir: str | os.PathLike) -> dict[str, dict]:
  """Every finished ``eval_*.json`` of the run, by name, sorted by name
  (partial results of an evaluation in progress, ``*.partial.json``, are
  not reports and are skipped)."""
  reports = {}
  for path in RunDirectory(workdir).report_paths():
    try:
      reports[path.stem] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"Cannot parse {path}: {e}.") from e
  return reports


def _is_checklist(contents: dict) -> bool:
  """A gradient-masking checklist's report (``evaluation.checklist``:
  its checks and the attacks' results), not an evaluation's results."""
  return "checks" in contents


def read_reports(
  workdir: str | os.PathLike,
) -> tuple[dict[str, dict], dict[str, dict]]:
  """The run's reports, each file read once, sorted by name:
  ({report name (e.g. "eval_paper_last"): results dict} of its evaluations,
  {report name (e.g. "eval_checklist_last"): checklist report
  {"run", "settings", "checks", "attacks"}} of its checklists)."""
  evaluations, checklists = {}, {}
  for name, contents in _read_reports(workdir).items():
    (checklists if _is_checklist(contents) else evaluations)[name] = contents
  return evaluations, checklists


def eval_reports(workdir: str | os.PathLike) -> dict[str, dict]:
  """{report name (e.g. "eval_paper_last"): results dict} of the run's
  evaluations, sorted by name (its checklists are left out)."""
  return read_reports(workdir)[0]


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's saved config."""
  return RunDirectory(workdir).load_config()


def defense_label(model_config: ml_collections.ConfigDict) -> str:
  """ "none", "cas", or "cifs" with the IMGF and k when they are not the
  paper's default (softmax, top-2), e.g. "cifs-sigmoid-top2"."""
  if model_config.defense != "cifs":
    return model_config.defense
  cifs = model_config.cifs
  if (cifs.imgf, cifs.topk) == ("softmax", 2):
    return "cifs"
  return f"cifs-{cifs.imgf}-top{cifs.topk}"


def run_setting(config: ml_collections.ConfigDict) -> dict:
  """The training setting of a run, as the report's run table shows it."""
  return {
    "dataset": config.data.name,
    "model": config.model.name,
    "width": config.model.width,
    "defense": defense_label(config.model),
    "method": config.train.method,
    "epochs": config.train.epochs,
    "train_examples": (
      "all" if config.train.max_examples < 0 else config.train.max_examples
    ),
    "eps": config.attack.eps,
    # The run it started from, by name (its path is the training machine's).
    "init_from": pathlib.Path(config.train.init_from).name,
  }


def run_label(workdir: str | os.PathLike) -> str:
  """A run's name in tables and legends: its directory's name."""
  return pathlib.Path(workdir).resolve().name


def main_report(reports: dict[str, dict]) -> tuple[str, dict] | None:
  """The report the per-class figure and the paper comparison read: the
  first paper-protocol one (by name), else the first; cascades are left
  out. None without such a report."""
  full = {name: r for name, r in reports.items() if not report.is_cascade(r)}
  for name, results in full.items():
    if results.get("protocol", {}).get("name") == "paper":
      return name, results
  return next(iter(full.items()), None)


def per_class_top1(results: dict, attack: str) -> list[float] | None:
  """Top-1 (%) per class under ``attack`` ("natural": clean inputs; an
  attack name: the worst case over its runs); None if not evaluated."""
  if attack == "natural":
    return results["natural"]["per_class"]
  entry = results.get("attacks", {}).get(attack)
  return None if entry is None else entry["worst_case"]["per_class"]
