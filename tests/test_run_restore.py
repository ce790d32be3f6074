"""Which checkpoint a training run starts from: ``checkpoint.restore_step``,
``train.init_from`` with ``train.init_from_checkpoint``, and the checks on a
checkpoint's saved position.

No training step runs: checkpoints with known contents are written through
the ``Trainer``'s own ``save`` and read back by ``restore_or_initialise``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import experiment_config
from cifs_jax.runs import checkpoints
from cifs_jax.runs import evaluation as runner
from cifs_jax.runs import trainer as trainer_lib
from cifs_jax.runs.directory import RunDirectory

STEPS_PER_EPOCH = 2  # 64 training examples, batch 32.


def _smoke_config(data_dir, **overrides):
  """``fmnist_resnet10.py:smoke`` on the 64 training examples in
  ``data_dir``, ``section__key=value``."""
  config = experiment_config.base_config()
  config.data.name, config.data.source = "fashion_mnist", "files"
  config.data.data_dir = str(data_dir)
  config.model.name = "resnet10"
  experiment_config.apply_variants(config, "smoke")
  config.model.width = 4
  config.train.max_examples = 64
  config.train.epochs = 3
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def smoke_config(tiny_fashion_mnist):
  """``_smoke_config`` on synthetic Fashion-MNIST files: what is restored
  does not depend on the images, so this runs without Debian's copy."""
  return functools.partial(_smoke_config, tiny_fashion_mnist)


def shifted_state(trainer, shift: int, epoch: int, step_in_epoch: int):
  """The initial state with every parameter, statistic and optimiser value
  moved by ``shift``, at the global step of (epoch, step_in_epoch)."""
  state = trainer.initial_state
  move = lambda tree: jax.tree.map(  # noqa: E731
    lambda x: x + jnp.asarray(shift, x.dtype), tree
  )
  return state.replace(
    step=jnp.asarray(epoch * STEPS_PER_EPOCH + step_in_epoch, jnp.int32),
    params=move(state.params),
    batch_stats=move(state.batch_stats),
    opt_state=move(state.opt_state),
  )


def write_run(workdir, config, entries):
  """Saves ``shifted_state(shift, epoch, step)`` with ``metrics`` for each
  (shift, epoch, step_in_epoch, metrics) in ``entries``."""
  trainer = trainer_lib.Trainer(config, str(workdir))
  try:
    for shift, epoch, step_in_epoch, metrics in entries:
      state = shifted_state(trainer, shift, epoch, step_in_epoch)
      trainer.save(
        trainer.parallel.replicate(state),
        trainer_lib.Position(epoch, step_in_epoch),
        metrics,
      )
  finally:
    trainer.close()


def start(workdir, config):
  """(state, position) that training in ``workdir`` would start from."""
  trainer = trainer_lib.Trainer(config, str(workdir))
  try:
    return trainer.restore_or_initialise(), trainer
  finally:
    trainer.close()


def assert_trees_equal(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def natural_source(smoke_config, tmp_path_factory):
  """A natural run with checkpoints at epochs 1, 2, 3 (shifts 1, 2, 3);
  epoch 2 has the best natural accuracy, epoch 1 the best PGD accuracy."""
  workdir = tmp_path_factory.mktemp("natural_source")
  write_run(
    workdir,
    smoke_config(train__method="natural"),
    [
      (1, 1, 0, {"natural_accuracy": 50.0, "pgd_accuracy": 9.0}),
      (2, 2, 0, {"natural_accuracy": 90.0, "pgd_accuracy": 1.0}),
      (3, 3, 0, {"natural_accuracy": 70.0, "pgd_accuracy": 2.0}),
    ],
  )
  return workdir


@pytest.mark.parametrize(
  "which,shift",
  [(None, 2), ("best", 2), ("last", 3), (str(STEPS_PER_EPOCH), 1)],
  ids=["default_is_best", "best", "last", "step"],
)
def test_init_from_takes_the_chosen_checkpoint_and_a_fresh_optimiser(
  smoke_config, tmp_path, natural_source, which, shift
):
  overrides = {"train__init_from": str(natural_source)}
  if which is not None:
    overrides["train__init_from_checkpoint"] = which
  # An adversarial run: "best" is still the source's (natural accuracy).
  (state, position), trainer = start(
    tmp_path / "run", smoke_config(**overrides)
  )
  source = shifted_state(trainer, shift, 0, 0)
  assert_trees_equal(state.params, source.params)
  assert_trees_equal(state.batch_stats, source.batch_stats)
  assert_trees_equal(state.opt_state, trainer.initial_state.opt_state)
  assert int(state.step) == 0 and position == trainer_lib.Position(0, 0)


def test_starting_from_or_evaluating_a_checkpoint_reads_only_its_weights(
  smoke_config, tmp_path
):
  """``train.init_from`` and evaluation read params and batch statistics,
  not the optimiser state: a source saved with another optimiser (here an
  optimiser state of another structure) still serves both."""
  source, config = tmp_path / "source", smoke_config(train__method="natural")
  trainer = trainer_lib.Trainer(config, str(source))
  try:
    weights = shifted_state(trainer, 1, 1, 0)
    trainer.save(
      trainer.parallel.replicate(
        weights.replace(opt_state={"another_optimiser": jnp.zeros(3)})
      ),
      trainer_lib.Position(1, 0),
      {"natural_accuracy": 50.0},
    )
  finally:
    trainer.close()

  (state, _), trainer = start(
    tmp_path / "run", smoke_config(train__init_from=str(source))
  )
  assert_trees_equal(state.variables, weights.variables)
  assert_trees_equal(state.opt_state, trainer.initial_state.opt_state)

  _, variables, label = runner.restore_checkpoint(
    config, RunDirectory(source), "last"
  )
  assert_trees_equal(variables, weights.variables)
  assert label["step"] == STEPS_PER_EPOCH


def test_init_from_reads_without_creating_anything(
  smoke_config, tmp_path, natural_source
):
  before = sorted(natural_source.rglob("*"))
  start(tmp_path / "run", smoke_config(train__init_from=str(natural_source)))
  assert sorted(natural_source.rglob("*")) == before
  typo = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match=f"{typo} does not exist"):
    start(tmp_path / "run2", smoke_config(train__init_from=str(typo)))
  assert not typo.exists()


def test_restore_step_resumes_there_and_sets_the_later_steps_aside(
  smoke_config, tmp_path
):
  workdir = tmp_path / "run"
  config = smoke_config()
  write_run(
    workdir, config, [(1, 1, 0, None), (2, 2, 0, None), (3, 2, 1, None)]
  )
  with pytest.raises(FileNotFoundError, match=r"step 3 .*\[2, 4, 5\]"):
    start(workdir, smoke_config(checkpoint__restore_step=3))

  (state, position), trainer = start(
    workdir, smoke_config(checkpoint__restore_step=2 * STEPS_PER_EPOCH)
  )
  expected = shifted_state(trainer, 2, 2, 0)
  assert_trees_equal(state, expected)
  assert position == trainer_lib.Position(2, 0)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [
    2,
    4,
  ]
  (aside,) = (workdir / "checkpoints_superseded").iterdir()
  assert aside.name.startswith("after_step_4_")
  assert [p.name for p in aside.iterdir()] == ["5"]
  # The default resumes from the latest again.
  (state, position), _ = start(workdir, config)
  assert position == trainer_lib.Position(2, 0)


@pytest.mark.parametrize(
  "epoch,step_in_epoch,step,message",
  [
    (4, 0, 8, r"out of range: epoch=4 \(allowed 0 to train.epochs=3\)"),
    (1, 2, 4, r"step_in_epoch=2 \(allowed 0 to 1"),
    (1, 1, 2, r"disagrees with its step counter 2"),
    ("1", 0, 2, r"epoch='1'.*expected integers"),
  ],
)
def test_a_checkpoint_position_out_of_range_is_refused(
  smoke_config, tmp_path, epoch, step_in_epoch, step, message
):
  workdir = tmp_path / "run"
  trainer = trainer_lib.Trainer(smoke_config(), str(workdir))
  try:
    state = trainer.initial_state.replace(step=jnp.asarray(step, jnp.int32))
    trainer.checkpointer.save(
      step, state, metadata={"epoch": epoch, "step_in_epoch": step_in_epoch}
    )
  finally:
    trainer.close()
  with pytest.raises(ValueError, match=message):
    start(workdir, smoke_config())


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      {"checkpoint__restore_step": -2},
      r"config.checkpoint.restore_step=-2: expected -1",
    ),
    (
      {"train__init_from_checkpoint": "²"},
      r"config.train.init_from_checkpoint: expected 'best', 'last' or a step",
    ),
  ],
)
def test_bad_checkpoint_choices_are_named_before_anything_is_written(
  smoke_config, tmp_path, overrides, message
):
  with pytest.raises(ValueError, match=message):
    trainer_lib.Trainer(smoke_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_restore_step_without_checkpoints_is_an_error(smoke_config, tmp_path):
  with pytest.raises(FileNotFoundError, match="restore_step=4, but"):
    start(tmp_path / "run", smoke_config(checkpoint__restore_step=4))


def test_a_damaged_checkpoint_is_refused_with_the_step_to_fall_back_to(
  smoke_config,
  tmp_path,
):
  workdir = tmp_path / "run"
  write_run(workdir, smoke_config(), [(1, 1, 0, None), (2, 2, 0, None)])
  state_dir = workdir / "checkpoints" / "4" / "state"
  largest = max(
    (p for p in state_dir.rglob("*") if p.is_file()),
    key=lambda p: p.stat().st_size,
  )
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x01  # One flipped bit.
  largest.write_bytes(bytes(data))
  with pytest.raises(
    checkpoints.CheckpointError,
    match=rf"(?s){largest.relative_to(state_dir.parent)}: sha256 differs"
    r".*restore_step",
  ):
    start(workdir, smoke_config())
  (state, position), trainer = start(
    workdir, smoke_config(checkpoint__restore_step=2)
  )
  assert_trees_equal(state, shifted_state(trainer, 1, 1, 0))
