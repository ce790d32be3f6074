"""Results as JSON, as Markdown tables, and as a table on the console.

All three render the results dict of ``summary.summarize`` (accuracies in %);
the tables are built once (``tables``) and formatted as Markdown or as
aligned plain text.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)

# The tables printed on the console (the others are in the Markdown file).
CONSOLE_TABLES = 4
# Table 1's rows: our headline (per example, the worst case over every
# beta_atk target and gradient mode, which is stronger) and the paper's
# comparator (the lowest accuracy among the separate per-beta_atk attacks).
WORST_CASE_ROW = "per-example worst case"
MIN_OVER_BETA = "min over beta_atk (paper's comparator)"
# A cascade's Table 1 row: each attack's column counts the examples it and
# every earlier attack fooled.
CASCADE_ROW = "worst case after this attack and every earlier one"


def publish(
  results: dict, directory: str, name: str = "eval"
) -> tuple[str, str]:
  """Writes ``<name>.json`` and ``<name>.md`` to ``directory``; returns the
  two paths (``console_summary`` gives the tables to print)."""
  json_path = os.path.join(directory, f"{name}.json")
  markdown_path = os.path.join(directory, f"{name}.md")
  write_json(results, json_path)
  write_markdown(results, markdown_path)
  return json_path, markdown_path


def write_json(results: dict, path: str) -> None:
  """Writes ``results`` as indented JSON (creating the directory)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")


def write_markdown(results: dict, path: str) -> None:
  """Writes ``to_markdown(results)`` to ``path`` (creating the directory)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(to_markdown(results))


def to_markdown(results: dict) -> str:
  """Every table of ``tables`` as a Markdown document."""
  protocol = results["protocol"]
  lines = [
    f'# Robust accuracy (%), protocol "{protocol["name"]}"',
    "",
    *run_lines(results.get("run")),
    _description(results),
    "",
  ]
  for title, header, rows in tables(results):
    lines += [
      f"## {title}",
      "",
      _markdown_row(header),
      _markdown_row(["---"] * len(header)),
    ]
    lines += [_markdown_row(row) for row in rows] + [""]
  return "\n".join(lines)


def console_summary(results: dict) -> str:
  """The first ``CONSOLE_TABLES`` tables as aligned plain text."""
  header = [*run_lines(results.get("run")), _description(results)]
  blocks = ["\n".join(header)]
  for title, header, rows in tables(results)[:CONSOLE_TABLES]:
    widths = [
      max(len(cell) for cell in column) for column in zip(header, *rows)
    ]
    text = [title] + [
      "  ".join(
        cell.rjust(width) if i else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(row, widths))
      )
      for row in [header, *rows]
    ]
    blocks.append("\n".join(text))
  return "\n\n".join(blocks)


def is_cascade(results: dict) -> bool:
  """Whether an evaluation ran as a cascade (each run only on the examples
  every earlier run left robust): its per-attack, per-beta_atk and top-k
  numbers count only what each run attacked, and only its stages and
  final-head worst case are the full protocol's."""
  return bool(results.get("cascade"))


def tables(results: dict) -> list[Table]:
  """Table 1, stages, per beta_atk, per gradient mode, Table 4, Table 5, per
  class; for a cascade, ``cascade_tables``."""
  if is_cascade(results):
    return cascade_tables(results)
  attacks = results["attacks"]
  natural = results["natural"]
  columns = (
    [("Natural", natural)]
    + [(attack["label"], attack["worst_case"]) for attack in attacks.values()]
    + [("Worst case", results["worst_case"])]
  )
  probes = [f"probe{p}" for p in range(results["num_probes"])]
  targets = _keys_in_order(a["per_beta"] for a in attacks.values())
  modes = _keys_in_order(a["per_gradient"] for a in attacks.values())
  min_over_beta = (
    [natural["top1"]]
    + [attack["min_over_beta"] for attack in attacks.values()]
    + [results["min_over_beta"]]
  )
  return [
    (
      "Table 1: top-1 of the final head",
      [""] + [label for label, _ in columns],
      [
        [WORST_CASE_ROW] + [_pct(summary["top1"]) for _, summary in columns],
        [MIN_OVER_BETA] + [_pct(value) for value in min_over_beta],
      ],
    ),
    _stages_table(results),
    (
      "Per beta_atk (worst case over gradient modes)",
      ["attack"] + targets + ["all", MIN_OVER_BETA],
      [
        [a["label"]]
        + [_pct(a["per_beta"].get(t)) for t in targets]
        + [_pct(a["worst_case"]["top1"]), _pct(a["min_over_beta"])]
        for a in attacks.values()
      ],
    ),
    (
      "Per gradient mode (worst case over beta_atk)",
      ["attack"] + modes + ["all"],
      [
        [a["label"]]
        + [_pct(a["per_gradient"].get(m)) for m in modes]
        + [_pct(a["worst_case"]["top1"])]
        for a in attacks.values()
      ],
    ),
    (
      "Table 4: top-k accuracy (worst case)",
      ["attack", "top-1", "top-2", "top-3"],
      [
        [label] + [_pct(summary[f"top{k}"]) for k in (1, 2, 3)]
        for label, summary in columns
      ],
    ),
    (
      "Table 5: attack point / output head (top-1)",
      ["attack", "attack point", "final"] + probes,
      [
        [a["label"], point]
        + [_pct(outputs.get(head)) for head in ["final"] + probes]
        for a in attacks.values()
        for point, outputs in a["table5"].items()
      ],
    ),
    _per_class_table(results, columns),
  ]


def cascade_tables(results: dict) -> list[Table]:
  """A cascade's tables (``evaluator``: each run attacked only the examples
  every earlier run left robust): Table 1 with each attack's cumulative
  worst case (the stages), the runs in order, and per class.

  What a cascade measures of one attack or beta_atk is only what it did to
  the examples it was given, so the per-attack, per-beta_atk, per-gradient,
  top-k and probe-head tables of the full protocol are left out: read the
  runs' table, or run the full protocol.
  """
  stages = results["stages"]
  attacks = results["attacks"]
  attack_names = [name for name in stages if name != "clean"]
  return [
    (
      "Table 1: top-1 of the final head (cascade)",
      ["", "Natural"]
      + [attacks[name]["label"] for name in attack_names]
      + ["Worst case"],
      [
        [CASCADE_ROW, _pct(results["natural"]["top1"])]
        + [_pct(stages[name]) for name in attack_names]
        + [_pct(results["worst_case"]["top1"])]
      ],
    ),
    (
      "Cascade runs in order (cumulative worst case after each)",
      ["run", "examples attacked", "top-1 after", "seconds"],
      [
        [
          name,
          str(run["attacked"]),
          _pct(run["robust_accuracy"]),
          "-" if run["seconds"] is None else f"{run['seconds']:.0f}",
        ]
        for name, run in results["cascade"]["runs"].items()
      ],
    ),
    _per_class_table(
      results,
      [("Natural", results["natural"]), ("Worst case", results["worst_case"])],
    ),
  ]


def _stages_table(results: dict) -> Table:
  attacks = results["attacks"]
  return (
    "Robust accuracy after each stage (cumulative worst case, in order)",
    ["after", "top-1"],
    [
      [attacks[name]["label"] if name in attacks else name, _pct(top1)]
      for name, top1 in results["stages"].items()
    ],
  )


def _per_class_table(results: dict, columns: list[tuple[str, dict]]) -> Table:
  """Top-1 per class of each (label, summary) column."""
  class_names = results["class_names"] or [
    str(c) for c in range(results["num_classes"])
  ]
  return (
    "Per class: top-1 (worst case)",
    ["class"] + [label for label, _ in columns],
    [
      [name] + [_pct(summary["per_class"][c]) for _, summary in columns]
      for c, name in enumerate(class_names)
    ],
  )


def _description(results: dict) -> str:
  protocol = results["protocol"]
  return (
    f"{results['num_examples']} examples; protocol "
    f'"{protocol["name"]}"; gradient modes: '
    f"{', '.join(protocol['gradient_modes'])}; beta_atk: "
    f"{', '.join(protocol['betas'])}; {results['num_probes']} probes."
  )


def run_lines(run: dict | None) -> list[str]:
  """What was evaluated (``runs.evaluation.run_label``), one line each,
  then a blank line; nothing without a label."""
  if not run:
    return []
  lines = [
    f"{run['dataset']}, {run['model']} (width {run['width']}),"
    f" defense {run['defense']}, trained with {run['train_method']};"
    f" eps {run['eps']:.6g}; protocol {run['protocol']};"
    f" {run['num_examples']} examples.",
  ]
  checkpoint = run["checkpoint"]
  if checkpoint:
    lines.append(
      f"Checkpoint: {checkpoint['which']} (step {checkpoint['step']}, epoch"
      f" {checkpoint['epoch']}); best = highest {checkpoint['best_metric']}"
      f" on the first {checkpoint['per_epoch_eval_examples']} test examples,"
      " measured every epoch."
    )
  lines.append(
    f"Date {run['date']}; device {run['device']}; jax {run['jax_version']};"
    f" git commit {run['git_commit']}."
  )
  return [line + "  " for line in lines[:-1]] + [lines[-1], ""]


def _keys_in_order(dicts) -> list[str]:
  """The keys of several dicts, first-seen order, without repeats."""
  return list(dict.fromkeys(key for d in dicts for key in d))


def _pct(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}"


def _markdown_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"
