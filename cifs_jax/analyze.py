"""Channel analysis of a trained run: ``python -m cifs_jax.analyze``.

  python -m cifs_jax.analyze --workdir=DIR [--class=NAME] [--attack=pgd20]
      [--num_examples=N] [--checkpoint=last] [--output=DIR/analysis]
      [--beta_atk=2] [--compare DIR2 ...]

Writes to ``--output``:

* ``channels_<class>_<attack>.png`` / ``.json`` / ``.npz``: the paper's
  Figure 1/3 panel for the test examples of one class (the magnitudes and
  activation frequencies of the last CIFS layer's channels, before and after
  the mask, or of the penultimate features of a vanilla / CAS model, against
  the channels sorted by the class's weights of the last linear layer);
* ``per_class_<attack>.png``: top-1 per class under the attack, from the
  ``eval_*.json`` report of this run and of every ``--compare`` run;
* ``training_curves.png``: Figure 4 for this run and the ``--compare`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cifs_jax import data, experiment_config
from cifs_jax.analysis import class_analysis, run_figures, runs
from cifs_jax.evaluation import protocols
from cifs_jax.runs import evaluation as run_evaluation
from cifs_jax.runs.directory import RunDirectory
from cifs_jax.runs import checkpoints


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m cifs_jax.analyze", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--workdir", required=True, help="A training run.")
  parser.add_argument(
    "--class",
    dest="class_name",
    default=None,
    help="Class name or index (default: the first class).",
  )
  parser.add_argument(
    "--attack",
    default="pgd20",
    choices=protocols.ATTACK_NAMES,
    help="The paper-protocol attack crafting the adversarial inputs.",
  )
  parser.add_argument(
    "--num_examples",
    type=int,
    default=-1,
    help="The first N test examples of the class (-1: all).",
  )
  parser.add_argument(
    "--checkpoint", default="last", help="'last', 'best' or a step number."
  )
  parser.add_argument("--beta_atk", type=float, default=2.0)
  parser.add_argument(
    "--batch_size", type=int, default=None, help="Default: eval.batch_size."
  )
  parser.add_argument(
    "--output",
    default=None,
    help="Output directory (default: WORKDIR/analysis).",
  )
  parser.add_argument(
    "--compare",
    nargs="*",
    default=[],
    help="Other runs for the per-class and training-curve figures.",
  )
  return parser.parse_args(argv)


def class_index(name: str | None, class_names: Sequence[str]) -> int:
  """The index of a class given by name or index (None: 0)."""
  if name is None:
    return 0
  if name in class_names:
    return list(class_names).index(name)
  if name.isdigit() and int(name) < len(class_names):
    return int(name)
  raise ValueError(
    f"--class={name!r}: not a class of this dataset; choose one of "
    f"{list(class_names)} or an index below {len(class_names)}."
  )


def file_stem(text: str) -> str:
  """``text`` with every character but letters, digits, - and _ as _."""
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def main(argv: Sequence[str]) -> None:
  args = parse_args(argv)
  run = RunDirectory(args.workdir)
  config = run.load_config()
  experiment_config.validate(config)
  model, variables, _ = run_evaluation.restore_checkpoint(
    config, run, checkpoints.parse_which(args.checkpoint)
  )
  class_names = data.get_info(config.data.name).class_names
  index = class_index(args.class_name, class_names)
  split = class_analysis.class_examples(
    data.load_split(config.data, "test"), index, args.num_examples
  )
  analysis = class_analysis.analyze_class(
    model,
    variables,
    split,
    index,
    class_analysis.paper_attack(args.attack, config.attack.eps),
    beta_atk=args.beta_atk,
    batch_size=args.batch_size or config.eval.batch_size,
  )
  output = args.output or os.path.join(args.workdir, "analysis")
  metadata = {
    "run": runs.run_label(args.workdir),
    "checkpoint": args.checkpoint,
    "class": class_names[index],
    "class_index": index,
    "attack": args.attack,
    "eps": config.attack.eps,
    "beta_atk": args.beta_atk,
  }
  stem = f"channels_{file_stem(class_names[index])}_{args.attack}"
  written = class_analysis.save_class_analysis(analysis, metadata, output, stem)
  workdirs = [args.workdir, *args.compare]
  per_class = run_figures.per_class_figure(
    workdirs, args.attack, os.path.join(output, f"per_class_{args.attack}.png")
  )
  curves = run_figures.training_curves_figure(
    workdirs, os.path.join(output, "training_curves.png")
  )
  accuracy = analysis["accuracy"]
  print(
    f"class {class_names[index]!r}: {analysis['num_examples']} examples, "
    f"natural {accuracy['natural']:.2f} %, {args.attack} "
    f"{accuracy['adversarial']:.2f} %"
  )
  for path in [*written.values(), per_class, curves]:
    if path is not None:
      print("wrote", path)
  if per_class is None:
    print(f"no per-class figure: no eval_*.json report with {args.attack}")


if __name__ == "__main__":
  main(sys.argv[1:])
