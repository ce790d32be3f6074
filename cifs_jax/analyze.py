"""Channel analysis of a trained run: ``python -m cifs_jax.analyze``.

  python -m cifs_jax.analyze --workdir=DIR [--class=NAME] [--attack=pgd20]
      [--num_examples=N] [--checkpoint=last] [--output=DIR/analysis]
      [--beta_atk=2] [--compare=DIR2,DIR3]

Writes to ``--output``:

* ``channels_<class>_<attack>.png`` / ``.json`` / ``.npz``: the paper's
  Figure 1/3 panel for the test examples of one class (the magnitudes and
  activation frequencies of the last CIFS layer's channels, before and after
  the mask, or of the penultimate features of a vanilla / CAS model, against
  the channels sorted by the class's weights of the last linear layer);
* ``per_class_<attack>.png``: top-1 per class under the attack, from the
  ``eval_*.json`` report of this run and of every ``--compare`` run;
* ``training_curves.png``: Figure 4 for this run and the ``--compare`` runs.

Flags follow ``cifs_jax.cli``: a user error (an unknown class or attack, a
workdir that is not a run, an unwritable output) prints one line and exits
with status 2 before any data is read.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from cifs_jax import cli, data
from cifs_jax.analysis import class_analysis, run_figures, runs
from cifs_jax.evaluation import protocols
from cifs_jax.runs import evaluation as run_evaluation
from cifs_jax.runs.directory import RunDirectory
from cifs_jax.runs import checkpoints

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run.")
_CLASS = flags.DEFINE_string(
  "class", None, "Class name or index (default: the first class)."
)
_ATTACK = flags.DEFINE_enum(
  "attack",
  "pgd20",
  list(protocols.ATTACK_NAMES),
  "The paper-protocol attack crafting the adversarial inputs.",
)
_NUM_EXAMPLES = flags.DEFINE_integer(
  "num_examples", -1, "The first N test examples of the class (-1: all)."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", "last", "'last', 'best' or a step number."
)
_BETA_ATK = flags.DEFINE_float(
  "beta_atk", 2.0, "beta of the joint loss the attack maximises."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", None, "Default: eval.batch_size."
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Output directory (default: WORKDIR/analysis)."
)
_COMPARE = flags.DEFINE_list(
  "compare",
  [],
  "Other runs for the per-class and training-curve figures, "
  "comma-separated (--compare DIR2 DIR3 also works).",
)
flags.mark_flags_as_required(["workdir"])


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
  # The positional arguments are more --compare runs (--compare A B).
  compare = [*_COMPARE.value, *argv[1:]]
  workdir = _WORKDIR.value
  cli.check_run_directory("workdir", workdir)
  for other in compare:
    cli.check_run_directory("compare", other, needs_checkpoints=False)
  try:
    which = checkpoints.parse_which(_CHECKPOINT.value)
  except ValueError as e:
    raise cli.UsageError(f"--checkpoint: {e}") from e
  run = RunDirectory(workdir)
  output = _OUTPUT.value or os.fspath(run.analysis_path)
  cli.check_writable_directory("output", output)
  config = cli.validated_config(run.load_config())
  class_names = data.get_info(config.data.name).class_names
  try:
    index = class_index(_CLASS.value, class_names)
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  model, variables, _ = run_evaluation.restore_checkpoint(config, run, which)
  split = class_analysis.class_examples(
    data.load_split(config.data, "test"), index, _NUM_EXAMPLES.value
  )
  attack = _ATTACK.value
  analysis = class_analysis.analyze_class(
    model,
    variables,
    split,
    index,
    class_analysis.paper_attack(attack, config.attack.eps),
    beta_atk=_BETA_ATK.value,
    batch_size=_BATCH_SIZE.value or config.eval.batch_size,
  )
  metadata = {
    "run": runs.run_label(workdir),
    "checkpoint": _CHECKPOINT.value,
    "class": class_names[index],
    "class_index": index,
    "attack": attack,
    "eps": config.attack.eps,
    "beta_atk": _BETA_ATK.value,
  }
  stem = f"channels_{file_stem(class_names[index])}_{attack}"
  written = class_analysis.save_class_analysis(analysis, metadata, output, stem)
  workdirs = [workdir, *compare]
  per_class = run_figures.per_class_figure(
    workdirs, attack, os.path.join(output, f"per_class_{attack}.png")
  )
  curves = run_figures.training_curves_figure(
    workdirs, os.path.join(output, "training_curves.png")
  )
  accuracy = analysis["accuracy"]
  print(
    f"class {class_names[index]!r}: {analysis['num_examples']} examples, "
    f"natural {accuracy['natural']:.2f} %, {attack} "
    f"{accuracy['adversarial']:.2f} %"
  )
  note = class_analysis.accuracy_note(accuracy, _BETA_ATK.value)
  if note:
    print(note)
  for path in [*written.values(), per_class, curves]:
    if path is not None:
      print("wrote", path)
  if per_class is None:
    print(f"no per-class figure: no eval_*.json report with {attack}")


if __name__ == "__main__":
  cli.run(main)
