"""Evaluates a checkpoint: ``python -m cifs_jax.evaluate --workdir=DIR``.

  python -m cifs_jax.evaluate --workdir=DIR [--config=configs/...py:variant]
      [--checkpoint=best|last|STEP]
      [--protocol=paper|strong|autoattack|autoattack-joint]
      [--attacks=fgsm,pgd20,cw,pgd100|apgd-ce,apgd-t,fab-t,square]
      [--num_examples=N]

Without ``--config`` the run's own ``DIR/config.json`` is used. Writes
``eval_<protocol>_<checkpoint>.json`` and ``.md`` to the workdir and prints
the main tables.
"""

from absl import app, flags
from ml_collections import config_flags

from cifs_jax import data, experiment_config, models
from cifs_jax.evaluation import protocols, runner
from cifs_jax.run_directory import RunDirectory
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
  "best",
  "'best' (by PGD accuracy during training; natural "
  "accuracy for natural training), 'last' or a step number.",
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
flags.mark_flags_as_required(["workdir"])


def parse_checkpoint(which: str) -> str | int:
  """ "best", "last" or a step number (ASCII digits) -> what to restore."""
  if which in ("best", "last"):
    return which
  if which.isascii() and which.isdigit():
    return int(which)
  raise app.UsageError(
    f"--checkpoint={which!r}: expected 'best', 'last' or a step number."
  )


def restore_variables(config, run: RunDirectory, which: str | int):
  """(model, variables) of checkpoint ``which`` of a run."""
  model = models.build_model(config.model)
  image_shape = data.get_info(config.data.name).image_shape
  target = create_train_state(model, image_shape, config, steps_per_epoch=1)
  with run.checkpointer(config) as checkpointer:
    state, _ = checkpointer.restore(which, target)
  return model, state.variables


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run = RunDirectory(_WORKDIR.value)
  which = parse_checkpoint(_CHECKPOINT.value)
  config = flags.FLAGS.config or run.load_config()
  experiment_config.validate(config)
  model, variables = restore_variables(config, run, which)
  test_split = data.load_split(config.data, "test")
  runner.evaluate_and_publish(
    config,
    model,
    variables,
    test_split,
    run.path,
    protocol_name=_PROTOCOL.value,
    num_examples=_NUM_EXAMPLES.value,
    attack_names=_ATTACKS.value,
    batch_size=_BATCH_SIZE.value,
    name=f"eval_{_PROTOCOL.value}_{_CHECKPOINT.value}",
  )


if __name__ == "__main__":
  app.run(main)
