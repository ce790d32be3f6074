"""The reproduction report: ``python -m cifs_jax.report``.

  python -m cifs_jax.report --runs DIR1 [DIR2 ...] --out report.md

Writes a Markdown report of the runs: their settings, Table 1 (Natural and
every evaluated attack: FGSM, PGD-20, C&W-inf, PGD-100, AutoAttack when
present), the paper's published numbers beside ours where the paper reports
the setting, top-1 per beta_atk, Table 4 (top-k), Table 5 and the figures
(per-class accuracy, training curves, and the channel figures that
``python -m cifs_jax.analyze`` left in the runs), drawn into
``<report stem>_figures/`` next to the report. Numbers come from the runs'
``eval_*.json`` reports (``python -m cifs_jax.evaluate``, or the end of
training) and ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cifs_jax.analysis import reproduction


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m cifs_jax.report", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--runs", nargs="+", required=True, help="Training run directories."
  )
  parser.add_argument("--out", required=True, help="The Markdown file.")
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
  args = parse_args(argv)
  reproduction.build_report(args.runs, args.out)
  print("wrote", args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
