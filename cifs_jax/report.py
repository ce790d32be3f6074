"""The reproduction report: ``python -m cifs_jax.report``.

  python -m cifs_jax.report --runs=DIR1[,DIR2...] --out=report.md

Writes a Markdown report of the runs: their settings, the trainer's final
natural and PGD check with standard errors, Table 1 (Natural and every
evaluated attack: FGSM, PGD-20, C&W-inf, PGD-100, AutoAttack when present;
examples and standard errors), the paper's published numbers beside ours
where the paper reports the setting, top-1 per beta_atk, Table 4 (top-k),
Table 5, the gradient-masking checklists and the figures (per-class
accuracy, training curves, and the channel figures that ``python -m
cifs_jax.analyze`` left in the runs), drawn into ``<report stem>_figures/``
next to the report. Numbers come from the runs' ``eval_*.json`` reports
(``python -m cifs_jax.evaluate``, or the end of training) and
``metrics.jsonl``.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from cifs_jax import cli
from cifs_jax.analysis import reproduction

_RUNS = flags.DEFINE_list(
  "runs",
  None,
  "Training run directories, comma-separated (--runs DIR1 DIR2 also works).",
)
_OUT = flags.DEFINE_string("out", None, "The Markdown file.")
flags.mark_flags_as_required(["runs", "out"])


def main(argv: Sequence[str]) -> None:
  # The positional arguments are more runs (the spelling --runs A B).
  run_dirs = [*_RUNS.value, *argv[1:]]
  for run_dir in run_dirs:
    cli.check_run_directory("runs", run_dir, needs_checkpoints=False)
  cli.check_writable_directory(
    "out", os.path.dirname(os.path.abspath(_OUT.value))
  )
  reproduction.build_report(run_dirs, _OUT.value)
  print("wrote", _OUT.value)


if __name__ == "__main__":
  cli.run(main)
