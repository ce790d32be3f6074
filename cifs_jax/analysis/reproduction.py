"""The reproduction report of several runs, as Markdown with figures.

Every number comes from a run's files: its ``eval_*.json`` reports
(``evaluation.summary`` describes their layout), ``config.json`` and
``metrics.jsonl``; the paper's numbers from ``paper_results``. Fields that
not every report has (AutoAttack, other attacks) are shown when present.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Sequence

from cifs_jax.analysis import paper_results, run_figures, runs
from cifs_jax.evaluation import protocols, report

CHANNEL_FIGURE_GLOB = "analysis/channels_*.png"
# The two ways to sum up an adaptive attack's runs (``evaluation.summary``).
MIN_OVER_BETA_LABEL = "min over beta_atk (as the paper)"
WORST_CASE_LABEL = "per-example worst case"


def pct(value: float | None) -> str:
  """An accuracy in % with two decimals; "-" when missing."""
  return "-" if value is None else f"{value:.2f}"


def standard_error(accuracy: float, num_examples: int) -> float:
  """The binomial standard error, in percentage points, of an accuracy in %
  measured on ``num_examples`` independent test examples."""
  p = accuracy / 100
  return 100 * math.sqrt(p * (1 - p) / num_examples)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (cells are converted with ``str``)."""
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  return "\n".join(
    [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]
  )


def attack_columns(reports: Sequence[dict]) -> list[tuple[str, str]]:
  """(attack name, label) of every attack in the reports: the paper's
  columns first (FGSM, PGD-20, C&W-inf, PGD-100), then others (AutoAttack,
  ...) in first-seen order."""
  seen = {}
  for results in reports:
    for name, attack in results.get("attacks", {}).items():
      seen.setdefault(name, attack.get("label", name))
  known = [n for n in protocols.ATTACK_NAMES if n in seen]
  return [(n, seen[n]) for n in known + [n for n in seen if n not in known]]


def table1_row(results: dict, columns: Sequence[tuple[str, str]]) -> list:
  """Natural, each attack's worst case (none for a cascade) and the overall
  worst case (%), the number of examples and the largest standard error of
  the row."""
  # A cascade's attack columns would count only what each attack was given
  # (``cascade_section`` has its stages).
  by_attack = (
    {}
    if report.is_cascade(results)
    else {
      name: attack["worst_case"]["top1"]
      for name, attack in results.get("attacks", {}).items()
    }
  )
  values = (
    [results["natural"]["top1"]]
    + [by_attack.get(name) for name, _ in columns]
    + [results["worst_case"]["top1"]]
  )
  num_examples = results["num_examples"]
  largest_error = max(
    standard_error(v, num_examples) for v in values if v is not None
  )
  return [pct(v) for v in values] + [num_examples, f"{largest_error:.2f}"]


def evaluated_checkpoint(results: dict) -> list[str]:
  """What a report evaluated, from its ``run`` entry: [checkpoint (which,
  step, epoch), eps, date, git commit]; "-" where a report has no entry."""
  run = results.get("run") or {}
  checkpoint = run.get("checkpoint") or {}
  which = (
    f"{checkpoint['which']} (step {checkpoint['step']}, epoch"
    f" {checkpoint['epoch']})"
    if checkpoint
    else "-"
  )
  eps = f"{run['eps']:.4g}" if "eps" in run else "-"
  return [
    which,
    eps,
    run.get("date", "-"),
    str(run.get("git_commit", "-"))[:10],
  ]


class Run:
  """One training run: its directory, setting, evaluation reports,
  gradient-masking checklists and the final check of its training."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.label = runs.run_label(workdir)
    self.setting = runs.run_setting(runs.load_run_config(workdir))
    self.reports, self.checklists = runs.read_reports(workdir)
    self.final_check = runs.final_check(runs.read_metrics(workdir))


def full_reports(run: Run) -> list[tuple[str, dict]]:
  """(name, results) of the run's reports that are not cascades
  (``report.is_cascade``): those whose per-attack tables are each attack's."""
  return [
    (name, results)
    for name, results in run.reports.items()
    if not report.is_cascade(results)
  ]


def final_check_section(all_runs: Sequence[Run]) -> list[str]:
  """Natural and PGD accuracy of the final state on the test examples
  training checked at its end (``final_check/*`` in metrics.jsonl)."""
  rows = []
  for run in all_runs:
    if run.final_check is None:
      continue
    num_examples = int(run.final_check["eval_examples"])
    rows.append(
      [run.label, num_examples]
      + [
        f"{pct(run.final_check[key])} ± "
        f"{standard_error(run.final_check[key], num_examples):.2f}"
        for key in ("natural_accuracy", "pgd_accuracy")
      ]
    )
  if not rows:
    return []
  return [
    "## Final check of training: natural and PGD accuracy (%)",
    "",
    "The trainer's check of its final state: PGD of `eval.pgd_steps` "
    "steps of size eps / 10 from the clean input, on the joint loss at "
    "beta_atk = `eval.beta_atk` (the reference's per-epoch check), on the "
    "first test examples; ± one binomial standard error.",
    "",
    markdown_table(["run", "examples", "natural", "PGD"], rows),
    "",
  ]


def checklist_section(all_runs: Sequence[Run]) -> list[str]:
  """Each checklist's checks: verdict and what was measured."""
  rows = [
    [
      run.label,
      name,
      check["number"],
      check["name"],
      check["verdict"],
      check["explanation"],
    ]
    for run in all_runs
    for name, results in run.checklists.items()
    for check in results["checks"]
  ]
  if not rows:
    return []
  return [
    "## Gradient-masking checklist",
    "",
    "`python -m cifs_jax.evaluate --protocol=checklist` "
    "(`cifs_jax/evaluation/checklist.py` lists the checks and their "
    "sources).",
    "",
    markdown_table(
      ["run", "report", "#", "check", "verdict", "measured"], rows
    ),
    "",
  ]


def runs_section(all_runs: Sequence[Run]) -> list[str]:
  keys = list(all_runs[0].setting)
  rows = [
    [run.label]
    + [run.setting[k] for k in keys]
    + [", ".join([*run.reports, *run.checklists])]
    for run in all_runs
  ]
  evaluations = [
    [
      run.label,
      name,
      results["protocol"]["name"],
      ", ".join(results["protocol"]["gradient_modes"]),
      ", ".join(results["protocol"]["betas"]),
      results["num_examples"],
      *evaluated_checkpoint(results),
    ]
    for run in all_runs
    for name, results in run.reports.items()
  ]
  return [
    "## Runs",
    "",
    markdown_table(["run", *keys, "eval reports"], rows),
    "",
    "## Evaluation reports",
    "",
    markdown_table(
      [
        "run",
        "report",
        "protocol",
        "gradient modes",
        "beta_atk",
        "examples",
        "checkpoint",
        "eps",
        "date",
        "commit",
      ],
      evaluations,
    ),
    "",
  ]


def table1_section(all_runs: Sequence[Run]) -> list[str]:
  reports = [r for run in all_runs for r in run.reports.values()]
  columns = attack_columns(reports)
  header = [
    "run",
    "report",
    "Natural",
    *(l for _, l in columns),
    "Worst case",
    "examples",
    "std. error <=",
  ]
  rows = [
    [run.label, name, *table1_row(results, columns)]
    for run in all_runs
    for name, results in run.reports.items()
  ]
  return [
    "## Table 1: top-1 accuracy (%)",
    "",
    "Each attack's column is the per-example worst case over its runs "
    "(every beta_atk and gradient mode of the protocol); a cascade "
    "(AutoAttack, `--cascade`) has only its worst case here, its stages "
    "below. The last column is the largest binomial standard error of the "
    "row, in points.",
    "",
    markdown_table(header, rows),
    "",
  ]


def cascade_section(all_runs: Sequence[Run]) -> list[str]:
  """Each cascade's stages: the robust accuracy after each attack and every
  earlier one, in the cascade's order."""
  rows = [
    [
      run.label,
      name,
      " → ".join(
        f"{results['attacks'].get(stage, {}).get('label', stage)} {pct(top1)}"
        for stage, top1 in results["stages"].items()
      ),
      results["num_examples"],
    ]
    for run in all_runs
    for name, results in run.reports.items()
    if report.is_cascade(results)
  ]
  if not rows:
    return []
  return [
    "## Cascades: top-1 after each stage (%)",
    "",
    "Each attack of a cascade runs only on the examples every earlier one "
    "left robust, so a stage is the worst case after that attack and every "
    "earlier one, in the cascade's order; the last is the worst case. Its "
    "per-attack numbers count only the examples each run was given, so the "
    "per-beta_atk, top-k and Table 5 sections leave cascades out.",
    "",
    markdown_table(["run", "report", "stages", "examples"], rows),
    "",
  ]


def paper_section(all_runs: Sequence[Run]) -> list[str]:
  """Our numbers beside the paper's, for runs in a setting it reports.

  The paper's attack columns are the lowest accuracy over separate attacks,
  one per beta_atk target (our ``min_over_beta``); the comparison and the
  difference use that. Our per-example worst case over every run, a
  stronger attack, is shown below it, labelled.
  """
  header = ["run", "", *(c for c in paper_results.COLUMNS)]
  rows, notes = [], []
  for run in all_runs:
    paper = paper_results.published(run.setting)
    found = runs.main_report(run.reports)
    if paper is None or found is None:
      continue
    name, results = found
    natural = {"natural": results["natural"]["top1"]}
    like_paper = {
      **natural,
      **{
        attack: entry.get("min_over_beta")
        for attack, entry in results["attacks"].items()
      },
    }
    worst_case = {
      **natural,
      **{
        attack: entry["worst_case"]["top1"]
        for attack, entry in results["attacks"].items()
      },
    }
    columns = paper_results.COLUMNS
    rows += [
      [
        run.label,
        f"ours, {MIN_OVER_BETA_LABEL} ({name})",
        *(pct(like_paper.get(c)) for c in columns),
      ],
      [
        run.label,
        f"paper ({paper.source})",
        *(pct(paper.accuracies[c]) for c in columns),
      ],
      [
        run.label,
        f"ours, {MIN_OVER_BETA_LABEL} - paper",
        *(
          "-"
          if like_paper.get(c) is None
          else f"{like_paper[c] - paper.accuracies[c]:+.2f}"
          for c in columns
        ),
      ],
      [
        run.label,
        f"ours, {WORST_CASE_LABEL} ({name})",
        *(pct(worst_case.get(c)) for c in columns),
      ],
    ]
    notes.append(
      f"{run.label}: the paper's eps is {paper.eps:.5f}, ours "
      f"{run.setting['eps']:.5f}; {results['num_examples']} test examples."
    )
  if not rows:
    return []
  return [
    "## Beside the paper",
    "",
    "The paper's numbers are its last-epoch results (Yan et al., ICML "
    "2021, Tables 1-3): per attack, the lowest accuracy over separate "
    "attacks, one per beta_atk target. Ours in the same sense "
    f"({MIN_OVER_BETA_LABEL}) is compared with them; our "
    f"{WORST_CASE_LABEL} (an example counts as "
    "robust only if it survives every beta_atk run) is stronger, never "
    "higher.",
    "",
    markdown_table(header, rows),
    "",
    *(f"- {note}" for note in notes),
    "",
  ]


def per_beta_section(all_runs: Sequence[Run]) -> list[str]:
  blocks = ["## Adaptive attack: top-1 per beta_atk (%)", ""]
  for run in all_runs:
    for name, results in full_reports(run):
      attacks = results["attacks"].values()
      targets = list(
        dict.fromkeys(t for a in attacks for t in a.get("per_beta", {}))
      )
      rows = [
        [a["label"]]
        + [pct(a.get("per_beta", {}).get(t)) for t in targets]
        + [pct(a["worst_case"]["top1"])]
        for a in attacks
      ]
      blocks += [
        f"### {run.label} / {name}",
        "",
        markdown_table(["attack", *targets, "all"], rows),
        "",
      ]
  return blocks


def topk_section(all_runs: Sequence[Run]) -> list[str]:
  rows = []
  for run in all_runs:
    for name, results in full_reports(run):
      summaries = [("Natural", results["natural"])] + [
        (a["label"], a["worst_case"]) for a in results["attacks"].values()
      ]
      rows += [
        [run.label, name, label] + [pct(s.get(f"top{k}")) for k in (1, 2, 3)]
        for label, s in summaries
      ]
  return [
    "## Table 4: top-k accuracy (%)",
    "",
    markdown_table(
      ["run", "report", "attack", "top-1", "top-2", "top-3"], rows
    ),
    "",
  ]


def table5_section(all_runs: Sequence[Run]) -> list[str]:
  rows = []
  heads = list(
    dict.fromkeys(
      ["final"]
      + [
        head
        for run in all_runs
        for _, results in full_reports(run)
        for a in results["attacks"].values()
        for outputs in a.get("table5", {}).values()
        for head in outputs
      ]
    )
  )
  for run in all_runs:
    for name, results in full_reports(run):
      rows += [
        [run.label, name, a["label"], point]
        + [pct(outputs.get(h)) for h in heads]
        for a in results["attacks"].values()
        for point, outputs in a.get("table5", {}).items()
      ]
  return [
    "## Table 5: attack point / output head, top-1 (%)",
    "",
    "Attack points: final (beta_atk = 0), probes (beta_atk = inf, all "
    "probes), probe<l> (beta_atk = inf, probe l alone), adaptive (all runs).",
    "",
    markdown_table(["run", "report", "attack", "attack point", *heads], rows),
    "",
  ]


def figures_section(
  all_runs: Sequence[Run], figure_dir: pathlib.Path, report_dir: pathlib.Path
) -> list[str]:
  """Draws the comparison figures into ``figure_dir``; embeds them and the
  channel figures that ``cifs_jax.analyze`` left in each run."""
  workdirs = [run.workdir for run in all_runs]
  figures = []
  for attack in ("pgd20", "natural"):
    path = run_figures.per_class_figure(
      workdirs, attack, figure_dir / f"per_class_{attack}.png"
    )
    if path is not None:
      figures.append((f"Top-1 per class, {attack}", path))
  figures.append(
    (
      "Training curves (Figure 4)",
      run_figures.training_curves_figure(
        workdirs, figure_dir / "training_curves.png"
      ),
    )
  )
  for run in all_runs:
    figures += [
      (f"{run.label}: channels, {path.stem}", path)
      for path in sorted(run.workdir.glob(CHANNEL_FIGURE_GLOB))
    ]
  lines = ["## Figures", ""]
  for title, path in figures:
    relative = os.path.relpath(path, report_dir)
    lines += [f"### {title}", "", f"![{title}]({relative})", ""]
  return lines


def build_report(
  workdirs: Sequence[str | os.PathLike], out_path: str | os.PathLike
) -> str:
  """Writes the Markdown report of ``workdirs`` to ``out_path`` and its
  figures to ``<out_path stem>_figures/``; returns the Markdown."""
  if not workdirs:
    raise ValueError("build_report needs at least one run directory.")
  out_path = pathlib.Path(out_path)
  figure_dir = out_path.parent / f"{out_path.stem}_figures"
  all_runs = [Run(workdir) for workdir in workdirs]
  missing = [run.label for run in all_runs if not run.reports]
  lines = [
    "# CIFS reproduction report",
    "",
    "Generated by `python -m cifs_jax.report` from the runs' files.",
    "",
    *runs_section(all_runs),
    *final_check_section(all_runs),
    *table1_section(all_runs),
    *cascade_section(all_runs),
    *paper_section(all_runs),
    *per_beta_section(all_runs),
    *topk_section(all_runs),
    *table5_section(all_runs),
    *checklist_section(all_runs),
    *figures_section(all_runs, figure_dir, out_path.parent),
  ]
  if missing:
    lines += [f"Runs without eval_*.json reports: {', '.join(missing)}.", ""]
  markdown = "\n".join(lines)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(markdown)
  return markdown
