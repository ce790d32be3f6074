"""The training loop: data on the devices, the compiled step, evaluation,
checkpoints, resume, logs.

``train_and_evaluate(config, workdir)`` is what ``python -m cifs_jax.main``
runs. The workdir holds ``config.json``, ``checkpoints/`` (Orbax),
``metrics.jsonl`` and TensorBoard event files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from cifs_jax import data, experiment_config, models
from cifs_jax.evaluation import runner
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax.run_directory import RunDirectory
from cifs_jax.training import metric_logging
from cifs_jax.training import step as step_lib
from cifs_jax.training.train_state import TrainState, create_train_state


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


@dataclasses.dataclass
class Position:
  """Where training stands: the next step to run is ``step`` of ``epoch``."""

  epoch: int = 0
  step: int = 0


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag checked between steps."""

  def __init__(self):
    self._event = threading.Event()

  def __bool__(self) -> bool:
    return self._event.is_set()

  @contextlib.contextmanager
  def installed(self):
    """Handles the signals inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    handler = lambda signum, frame: self._event.set()
    previous = {
      s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)


def _check_finite(metrics: dict[str, float], where: str) -> None:
  if not all(math.isfinite(v) for v in metrics.values()):
    raise NonFiniteLossError(
      f"Non-finite training metrics {metrics} at {where}. Training stopped; "
      "the last good checkpoint is kept. Lower train.learning_rate, check "
      "the data, or try without half_precision."
    )


class Trainer:
  """Owns the compiled steps, the device data and the run's files."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    experiment_config.validate(config)
    self.config = config
    self.run = RunDirectory(workdir)
    self.parallel = Parallel.create(config.parallel)
    num_devices = self.parallel.num_devices
    for name, size in (
      ("train.batch_size", config.train.batch_size),
      ("eval.batch_size", config.eval.batch_size),
    ):
      if size % num_devices:
        raise ValueError(
          f"config.{name}={size} must be a multiple of the "
          f"number of devices ({num_devices})."
        )
    self.run.check_compatible(config)
    self.run.save_config(config)

    self.train_split = data.load_split(config.data, "train").head(
      config.train.max_examples
    )
    self.test_split = data.load_split(config.data, "test")
    self.steps_per_epoch = data.steps_per_epoch(
      len(self.train_split), config.train.batch_size
    )
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"The training split has {len(self.train_split)} "
        "examples, fewer than one batch of "
        f"{config.train.batch_size}."
      )
    dtype = jnp.bfloat16 if config.half_precision else None
    self.model = models.build_model(
      config.model, dtype=dtype, bn_axis_name=BATCH_AXIS
    )
    self.initial_state = create_train_state(
      self.model,
      self.train_split.images.shape[1:],
      config,
      self.steps_per_epoch,
    )
    self.device_train = self.parallel.replicate(self.train_split)
    self.train_step = self.parallel.compile(
      step_lib.make_train_step(
        self.model, config, data.augment_options(config.data)
      ),
      sharded_args=(False, False, True),
      donate_first=True,
    )
    self.eval_step = self.parallel.compile(
      step_lib.make_eval_step(self.model, config), sharded_args=(False, True)
    )
    self.checkpointer = self.run.checkpointer(
      config, max_to_keep=config.checkpoint.keep
    )
    self.logger = metric_logging.MetricLogger(workdir)
    self.stop_request = StopRequest()

  # -- State ---------------------------------------------------------------

  def restore_or_initialise(self) -> tuple[TrainState, Position]:
    """The last checkpoint of this workdir, else a fresh (or ``init_from``)
    state. A checkpoint that fails to restore raises; it is never replaced
    by a fresh start."""
    if self.checkpointer.latest_step() is not None:
      state, metadata = self.checkpointer.restore("last", self.initial_state)
      position = Position(metadata["epoch"], metadata["step_in_epoch"])
      logging.info(
        "Resuming from %s at epoch %d, step %d.",
        self.run.path,
        position.epoch,
        position.step,
      )
      return state, position
    state = self.initial_state
    if self.config.train.init_from:
      # The finished model of the source run (its last checkpoint), as the
      # reference initialises AT from a fully trained natural model.
      source = RunDirectory(self.config.train.init_from)
      with source.checkpointer(self.config) as checkpointer:
        restored, _ = checkpointer.restore("last", self.initial_state)
      state = state.replace(
        params=restored.params, batch_stats=restored.batch_stats
      )
      logging.info(
        "Initialised the model from the last checkpoint of %s.",
        self.config.train.init_from,
      )
    return state, Position()

  def save(
    self,
    state: TrainState,
    position: Position,
    metrics: dict[str, float] | None = None,
  ) -> None:
    host_state = self.parallel.unreplicate(state)
    self.checkpointer.save(
      int(host_state.step),
      host_state,
      metadata={"epoch": position.epoch, "step_in_epoch": position.step},
      metrics=metrics,
    )

  # -- Evaluation ----------------------------------------------------------

  def evaluate(self, state: TrainState, num_examples: int) -> dict[str, float]:
    """Natural and PGD accuracy (%) on the first ``num_examples`` test
    examples (-1: all), each counted once."""
    split = self.test_split.head(num_examples)
    totals = None
    for batch in data.eval_batches(split, self.config.eval.batch_size):
      counts = self.eval_step(state, self.parallel.shard(batch))
      totals = (
        counts if totals is None else jax.tree.map(jnp.add, totals, counts)
      )
    totals = jax.tree.map(lambda x: float(np.asarray(x).reshape(-1)[0]), totals)
    return {
      "natural_accuracy": 100 * totals["natural_correct"] / totals["count"],
      "pgd_accuracy": 100 * totals["pgd_correct"] / totals["count"],
      "eval_examples": totals["count"],
    }

  # -- Training ------------------------------------------------------------

  def train(self) -> TrainState:
    """Runs (or resumes) training to ``train.epochs``; returns the state."""
    config = self.config
    state, position = self.restore_or_initialise()
    state = self.parallel.replicate(state)
    data_key = jax.random.key(config.seed)
    images_per_step = config.train.batch_size
    with self.stop_request.installed():
      while position.epoch < config.train.epochs:
        state, position = self._train_epoch(
          state, position, data_key, images_per_step
        )
        if self.stop_request:
          logging.warning(
            "Stop requested: saved at epoch %d, step %d.",
            position.epoch,
            position.step,
          )
          break
    self.checkpointer.wait_until_finished()
    return state

  def _train_epoch(self, state, position, data_key, images_per_step):
    config = self.config
    epoch = position.epoch
    batches = data.train_index_batches(
      data_key,
      epoch,
      len(self.train_split),
      config.train.batch_size,
      start_step=position.step,
    )
    epoch_sums = None
    bar = tqdm.tqdm(
      total=self.steps_per_epoch,
      initial=position.step,
      desc=f"epoch {epoch + 1}/{config.train.epochs}",
      disable=jax.process_index() != 0,
      leave=False,
    )
    # Throughput over the steps since the last log point (which synced with
    # the device), so only the first window after a start counts compiling.
    window_start, window_steps, steps_run = time.perf_counter(), 0, 0
    for indices in batches:
      state, metrics = self.train_step(
        state, self.device_train, self.parallel.shard(indices)
      )
      epoch_sums = (
        metrics
        if epoch_sums is None
        else jax.tree.map(jnp.add, epoch_sums, metrics)
      )
      position.step += 1
      steps_run += 1
      window_steps += 1
      if position.step % config.train.log_every_steps == 0:
        host = self._host_metrics(metrics)
        _check_finite(host, f"epoch {epoch + 1}, step {position.step}")
        now = time.perf_counter()
        images_per_second = (
          window_steps * images_per_step / (now - window_start)
        )
        window_start, window_steps = now, 0
        self.logger.write_scalars(
          epoch * self.steps_per_epoch + position.step,
          {
            **{f"train_{k}": v for k, v in host.items()},
            "images_per_second": images_per_second,
          },
        )
        bar.set_postfix(
          loss=f"{host['loss']:.3f}",
          acc=f"{host['accuracy']:.3f}",
          img_s=f"{images_per_second:.0f}",
        )
      bar.update(1)
      if self.stop_request:
        break
    bar.close()
    if epoch_sums is not None:
      means = {
        k: v / steps_run for k, v in self._host_metrics(epoch_sums).items()
      }
      _check_finite(means, f"the end of epoch {epoch + 1}")
    if self.stop_request and position.step < self.steps_per_epoch:
      self.save(state, position)
      return state, position
    position = Position(epoch + 1, 0)
    metrics = None
    if (epoch + 1) % config.eval.every_epochs == 0:
      metrics = self.evaluate(state, config.eval.num_examples)
      self.logger.write_scalars(
        (epoch + 1) * self.steps_per_epoch, {"epoch": epoch + 1, **metrics}
      )
      logging.info("epoch %d: %s", epoch + 1, metrics)
    self.save(state, position, metrics)
    return state, position

  def _host_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}

  def close(self) -> None:
    self.checkpointer.close()
    self.logger.close()


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains (resuming if ``workdir`` has checkpoints) and evaluates.

  Returns the evaluation of the final state on ``eval.final_num_examples``
  test examples (natural and PGD accuracy, %); an empty dict if a stop was
  requested before training finished. With ``eval.final``, also runs the
  robustness evaluation of ``eval.final_protocol`` (``cifs_jax.evaluation``)
  and writes ``eval_<protocol>.json`` / ``.md`` to the workdir (on several
  processes: all of them evaluate, process 0 writes).
  """
  trainer = Trainer(config, workdir)
  try:
    state = trainer.train()
    if trainer.stop_request:
      return {}
    results = trainer.evaluate(state, config.eval.final_num_examples)
    logging.info("Final evaluation: %s", results)
    if config.eval.final:
      runner.evaluate_and_publish(
        config,
        models.build_model(config.model),  # float32 attacks
        trainer.parallel.unreplicate(state).variables,
        trainer.test_split,
        trainer.run.path,
        protocol_name=config.eval.final_protocol,
        num_examples=config.eval.final_num_examples,
        attack_names=config.eval.final_attacks,
      )
    return results
  finally:
    trainer.close()
