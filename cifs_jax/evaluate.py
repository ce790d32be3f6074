"""Evaluates a checkpoint: ``python -m cifs_jax.evaluate --workdir=DIR``.

  python -m cifs_jax.evaluate --workdir=DIR [--config=configs/...py:variant]
      [--checkpoint=last|best|STEP] [--protocol=paper|strong]
      [--attacks=fgsm,pgd20,cw,pgd100] [--num_examples=N] [--output=DIR]

Without ``--config`` the run's own ``DIR/config.json`` is used. Writes
``eval_<protocol>_<checkpoint>.json`` and ``.md`` to ``--output`` (default:
the workdir, checked to be writable before any attack runs) and prints the
main tables. The workdir is only read. Interrupted (Ctrl-C), the same
command continues from the finished attacks
(``eval_<protocol>_<checkpoint>.partial.json``).
"""

from absl import app, flags
from ml_collections import config_flags

from cifs_jax import data, experiment_config, models
from cifs_jax.evaluation import protocols, runner
from cifs_jax.run_directory import RunDirectory
from cifs_jax.training import checkpoints
from cifs_jax.training.train_state import create_train_state

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
  "Evaluation protocol (README, docs/design.md).",
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


def parse_checkpoint(which: str) -> str | int:
  """ "best", "last" or a step number (ASCII digits) -> what to restore."""
  try:
    return checkpoints.parse_which(which)
  except ValueError as e:
    raise app.UsageError(f"--checkpoint: {e}") from e


def restore_variables(config, run: RunDirectory, which: str | int):
  """(model, variables, checkpoint label) of checkpoint ``which`` of a run,
  read without writing to the run; see ``runner.checkpoint_label``."""
  model = models.build_model(config.model)
  image_shape = data.get_info(config.data.name).image_shape
  target = create_train_state(model, image_shape, config, steps_per_epoch=1)
  with run.checkpointer(config, read_only=True) as checkpointer:
    state, metadata = checkpointer.restore(which, target)
  label = runner.checkpoint_label(config, which, int(state.step), metadata)
  return model, state.variables, label


def evaluate_run(
  workdir: str,
  *,
  config=None,
  checkpoint: str = "last",
  protocol: str = "paper",
  attacks: tuple[str, ...] = (),
  num_examples: int = -1,
  batch_size: int | None = None,
  output: str | None = None,
) -> dict:
  """What ``main`` does with its flags; returns the results dict.

  Raises:
    app.UsageError: ``checkpoint`` is not "best", "last" or a step.
    FileNotFoundError: no run directory, config.json or checkpoint.
    PermissionError: the output directory is not writable (before any
      attack runs).
  """
  run = RunDirectory(workdir)
  which = parse_checkpoint(checkpoint)
  config = config or run.load_config()
  experiment_config.validate(config)
  model, variables, label = restore_variables(config, run, which)
  test_split = data.load_split(config.data, "test")
  return runner.evaluate_and_publish(
    config,
    model,
    variables,
    test_split,
    output or workdir,
    protocol_name=protocol,
    num_examples=num_examples,
    attack_names=attacks,
    batch_size=batch_size,
    name=f"eval_{protocol}_{checkpoint}",
    checkpoint=label,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  evaluate_run(
    _WORKDIR.value,
    config=flags.FLAGS.config,
    checkpoint=_CHECKPOINT.value,
    protocol=_PROTOCOL.value,
    attacks=tuple(_ATTACKS.value),
    num_examples=_NUM_EXAMPLES.value,
    batch_size=_BATCH_SIZE.value,
    output=_OUTPUT.value,
  )


if __name__ == "__main__":
  app.run(main)
