"""``python -m cifs_jax.main`` with two hooks for tests/test_distributed.py.

  python -m tests.distributed_worker OUT_DIR HANG_AFTER_STEPS [main's flags]

* After training, every process writes the parameters it holds to
  ``OUT_DIR/params_process<i>.npz`` (keys as ``flat_params``).
* With HANG_AFTER_STEPS > 0, every process stops after that many training
  steps of its own, once the checkpoints in flight are on disk: it writes
  ``OUT_DIR/hung_process<i>`` and sleeps until it is killed (the test kills
  it mid-epoch, as a crash or a preemption would).
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np

from cifs_jax.runs import trainer as trainer_lib


def flat_params(params) -> dict[str, np.ndarray]:
  """{"['block']['kernel']": host array, ...} of a parameter pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def dump_params_after_training(out_dir: pathlib.Path) -> None:
  """Makes ``Trainer.train`` save this process's parameters when it ends."""
  train = trainer_lib.Trainer.train

  def train_and_dump(self):
    state = train(self)
    np.savez(
      out_dir / f"params_process{jax.process_index()}.npz",
      **flat_params(self.parallel.unreplicate(state).params),
    )
    return state

  trainer_lib.Trainer.train = train_and_dump


def hang_after(steps: int, out_dir: pathlib.Path) -> None:
  """Makes the trainer stop for good after ``steps`` training steps."""
  init = trainer_lib.Trainer.__init__

  def init_with_hang(self, *args, **kwargs):
    init(self, *args, **kwargs)
    train_step, calls = self.train_step, [0]

    def counted(*step_args):
      result = jax.block_until_ready(train_step(*step_args))
      calls[0] += 1
      if calls[0] == steps:
        self.checkpointer.wait_until_finished()
        (out_dir / f"hung_process{jax.process_index()}").touch()
        while True:
          time.sleep(60)
      return result

    self.train_step = counted

  trainer_lib.Trainer.__init__ = init_with_hang


if __name__ == "__main__":
  # Only here: importing main defines its absl flags, which would clash with
  # cifs_jax.evaluate's in a test process that imports flat_params.
  from cifs_jax import cli, main

  out, hang_steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
  dump_params_after_training(out)
  if hang_steps > 0:
    hang_after(hang_steps, out)
  sys.argv = [sys.argv[0], *sys.argv[3:]]
  cli.run(main.main)
