"""Evaluates a checkpoint: ``python -m cifs_jax.evaluate --workdir=DIR``.

  python -m cifs_jax.evaluate --workdir=DIR [--config=configs/...py:variant]
      [--checkpoint=last|best|STEP]
      [--protocol=paper|strong|autoattack|autoattack-joint]
      [--attacks=fgsm,pgd20,cw,pgd100|apgd-ce,apgd-t,fab-t,square]
      [--num_examples=N] [--output=DIR]

Without ``--config`` the run's own ``DIR/config.json`` is used. Writes
``eval_<protocol>_<checkpoint>.json`` and ``.md`` to ``--output`` (default:
the workdir, checked to be writable before any attack runs) and prints the
main tables. The workdir is only read. Interrupted (Ctrl-C), the same
command continues from the finished attacks
(``eval_<protocol>_<checkpoint>.partial.json``). Names, values and paths
are checked before any data is read: a user error prints one line and exits
with status 2 (``cifs_jax.cli``); ``--config.attack.eps=8/255`` takes a pixel
fraction.
"""

from absl import flags
from ml_collections import config_flags

from cifs_jax import cli, distributed, library_logs
from cifs_jax.evaluation import protocols, runner
from cifs_jax.training import checkpoints

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
  list(protocols.PROTOCOLS),
  "Evaluation protocol (docs/evaluation.md).",
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
flags.mark_flags_as_required(["workdir"])


@flags.multi_flags_validator(
  ["protocol", "attacks"],
  message="--attacks names an attack its --protocol does not have.",
)
def _attacks_of_protocol(values) -> bool:
  """True if every --attacks name is an attack of --protocol; otherwise
  raises flags.ValidationError naming the unknown ones and the protocol's."""
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
  runner.evaluate_checkpoint(
    _WORKDIR.value,
    config=config,
    checkpoint=_CHECKPOINT.value,
    protocol=_PROTOCOL.value,
    attacks=tuple(_ATTACKS.value),
    num_examples=_NUM_EXAMPLES.value,
    batch_size=_BATCH_SIZE.value,
    output=_OUTPUT.value,
  )


if __name__ == "__main__":
  cli.run(main)
