"""Evaluates a checkpoint: ``python -m cifs_jax.evaluate --workdir=DIR``.

  python -m cifs_jax.evaluate --workdir=DIR [--config=configs/...py:variant]
      [--checkpoint=last|best|STEP]
      [--protocol=paper|strong|autoattack|autoattack-joint|checklist]
      [--attacks=fgsm,pgd20,cw,pgd100|apgd-ce,apgd-t,fab-t,square]
      [--num_examples=N] [--output=DIR] [--cascade] [--surrogate=DIR]

Without ``--config`` the run's own ``DIR/config.json`` is used. Writes
``eval_<protocol>_<checkpoint>.json`` and ``.md`` to ``--output`` (default:
the workdir, checked to be writable before any attack runs) and prints the
main tables. The workdir is only read. Interrupted (Ctrl-C), the same
command continues from the finished attacks
(``eval_<protocol>_<checkpoint>.partial.json``). Names, values and paths
are checked before any data is read: a user error prints one line and exits
with status 2 (``cifs_jax.cli``); ``--config.attack.eps=8/255`` takes a pixel
fraction.

``--cascade`` (paper and strong protocols; AutoAttack's always are) runs the
attacks strongest first, each only on the examples still robust: the same
per-example worst case of the final head, at a cost that falls with
robustness; its report shows each attack's cumulative worst case and the
runs in order, not the per-attack tables (docs/evaluation.md). Its report
is ``eval_<protocol>_cascade_<checkpoint>``.

``--protocol=checklist`` runs the gradient-masking checklist
(``evaluation/checklist.py``) instead: numbered checks, each "pass", "warn"
or "not run"; ``--surrogate`` names a run trained the same way without the
defence, whose PGD transfers are check 12.
"""

from absl import flags
from ml_collections import config_flags

from cifs_jax import cli, distributed, library_logs
from cifs_jax.evaluation import checklist, protocols
from cifs_jax.runs import checkpoints
from cifs_jax.runs import evaluation as run_evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (default: the workdir's config.json).",
  lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  "last",
  "'last' (the paper's Table 1), 'best' (by PGD accuracy on the per-epoch "
  "evaluation; natural accuracy for natural training) or a step number.",
)
_PROTOCOL = flags.DEFINE_enum(
  "protocol",
  "paper",
  [*protocols.PROTOCOLS, checklist.NAME],
  "Evaluation protocol (docs/evaluation.md), or the gradient-masking "
  "checklist.",
)
_ATTACKS = flags.DEFINE_list(
  "attacks",
  [],
  "Subset of the protocol's attacks: "
  f"{', '.join(protocols.ATTACK_NAMES)} (default: all).",
)
_NUM_EXAMPLES = flags.DEFINE_integer(
  "num_examples", -1, "Evaluate the first N test examples (-1: all)."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", None, "Global eval batch (default: eval.batch_size)."
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Directory for the reports (default: the workdir)."
)
_CASCADE = flags.DEFINE_bool(
  "cascade",
  False,
  "paper/strong: only the per-example worst case, each attack (strongest "
  "first) on the examples still robust (AutoAttack's protocols always are).",
)
_SURROGATE = flags.DEFINE_string(
  "surrogate",
  None,
  "checklist: workdir of a run trained the same way without the defence "
  "(the transfer check; not run without it).",
)
_SURROGATE_CHECKPOINT = flags.DEFINE_string(
  "surrogate_checkpoint", "last", "checklist: the surrogate's checkpoint."
)
flags.mark_flags_as_required(["workdir"])


@flags.multi_flags_validator(
  ["protocol", "cascade"],
  message="--cascade applies to the paper and strong protocols.",
)
def _cascade_of_protocol(values) -> bool:
  """False if --cascade is given with a protocol that is already a cascade
  (AutoAttack's) or with the checklist."""
  make = protocols.PROTOCOLS.get(values["protocol"])
  return not values["cascade"] or (make is not None and not make().cascade)


@flags.multi_flags_validator(
  ["protocol", "attacks", "surrogate"],
  message="--attacks names an attack its --protocol does not have.",
)
def _attacks_of_protocol(values) -> bool:
  """True if every --attacks name is an attack of --protocol (the checklist
  takes none, and only it takes --surrogate); otherwise raises
  flags.ValidationError naming the unknown ones and the protocol's."""
  if values["protocol"] == checklist.NAME:
    if values["attacks"]:
      raise flags.ValidationError("--attacks does not apply to the checklist.")
    return True
  if values["surrogate"]:
    raise flags.ValidationError(
      "--surrogate applies to --protocol=checklist only."
    )
  try:
    protocols.PROTOCOLS[values["protocol"]]().select(values["attacks"])
  except ValueError as e:
    raise flags.ValidationError(f"--attacks: {e}") from e
  return True


def parse_checkpoint(which: str) -> str | int:
  """ "best", "last" or a step number (ASCII digits) -> what to restore."""
  try:
    return checkpoints.parse_which(which)
  except ValueError as e:
    raise cli.UsageError(f"--checkpoint: {e}") from e


def main(argv):
  cli.no_positional_arguments(argv)
  parse_checkpoint(_CHECKPOINT.value)
  config = cli.validated_config(flags.FLAGS.config)
  cli.check_run_directory(
    "workdir", _WORKDIR.value, needs_config=config is None
  )
  output = _OUTPUT.value
  cli.check_writable_directory(
    "output" if output else "workdir", output or _WORKDIR.value
  )
  library_logs.quiet_from_flags()
  distributed.initialize_from_flags()
  if _PROTOCOL.value == checklist.NAME:
    parse_checkpoint(_SURROGATE_CHECKPOINT.value)
    if _SURROGATE.value:
      cli.check_run_directory("surrogate", _SURROGATE.value)
    run_evaluation.checklist_checkpoint(
      _WORKDIR.value,
      config=config,
      checkpoint=_CHECKPOINT.value,
      num_examples=_NUM_EXAMPLES.value,
      batch_size=_BATCH_SIZE.value,
      output=_OUTPUT.value,
      surrogate=_SURROGATE.value,
      surrogate_checkpoint=_SURROGATE_CHECKPOINT.value,
    )
    return
  run_evaluation.evaluate_checkpoint(
    _WORKDIR.value,
    config=config,
    checkpoint=_CHECKPOINT.value,
    protocol=_PROTOCOL.value,
    attacks=tuple(_ATTACKS.value),
    num_examples=_NUM_EXAMPLES.value,
    batch_size=_BATCH_SIZE.value,
    output=_OUTPUT.value,
    cascade=_CASCADE.value,
  )


if __name__ == "__main__":
  cli.run(main)
