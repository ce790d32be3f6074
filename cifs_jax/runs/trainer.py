"""The training loop: data on the devices, the compiled step, evaluation,
checkpoints, resume, logs.

``train_and_evaluate(config, workdir)`` is what ``python -m cifs_jax.main``
runs. The workdir holds ``config.json``, ``checkpoints/`` (Orbax),
``metrics.jsonl`` and TensorBoard event files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from cifs_jax.runs import evaluation as run_evaluation
from cifs_jax.parallel import BATCH_AXIS, Parallel, is_chief
from cifs_jax.runs.directory import (
  RunDirectory,
  check_writable_directory,
  final_report_name,
)
from cifs_jax.runs import checkpoints
from cifs_jax.runs import metric_logging
from cifs_jax.training import step as step_lib
from cifs_jax.training.train_state import (
  TrainState,
  create_train_state,
  learning_rate_schedule,
)


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


def parse_init_from_checkpoint(config: ml_collections.ConfigDict) -> str | int:
  """``train.init_from_checkpoint`` as ``Checkpointer.restore`` takes it.

  Raises:
    ValueError: naming the key and its allowed values.
  """
  try:
    return checkpoints.parse_which(config.train.init_from_checkpoint)
  except ValueError as e:
    raise ValueError(f"config.train.init_from_checkpoint: {e}") from e


def check_checkpoint_keys(config: ml_collections.ConfigDict) -> None:
  """Checks ``checkpoint.restore_step`` and ``train.init_from_checkpoint``.

  Raises:
    ValueError: naming the key and its allowed values.
  """
  restore_step = config.checkpoint.restore_step
  if isinstance(restore_step, bool) or not (
    isinstance(restore_step, int) and restore_step >= -1
  ):
    raise ValueError(
      f"config.checkpoint.restore_step={restore_step!r}: expected -1 (the"
      " latest checkpoint) or a checkpoint step >= 0."
    )
  parse_init_from_checkpoint(config)


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
    check_checkpoint_keys(config)
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
    self._create_state = functools.partial(
      create_train_state,
      self.model,
      self.train_split.images.shape[1:],
      config,
      self.steps_per_epoch,
    )
    # Shapes only (no compiling): the target of a restore, on this process's
    # first device as the fresh state would be. A resumed run, or a complete
    # one run again, never builds the fresh state.
    first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.abstract_state = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=first_device
      ),
      jax.eval_shape(self._create_state),
    )
    # Written once the config has built the data and the model, so a config
    # that fails there leaves no config.json behind.
    self.run.save_config(config)
    self.learning_rate = learning_rate_schedule(
      config.train, self.steps_per_epoch
    )
    self.device_train = self.parallel.replicate(self.train_split)
    self.train_step = self.parallel.compile(
      step_lib.make_train_step(
        self.model,
        config,
        data.augment_options(config.data),
        self.steps_per_epoch,
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
    # Opened once training knows where it resumes (``train``).
    self.logger: metric_logging.MetricLogger | None = None
    self.stop_request = StopRequest()

  # -- State ---------------------------------------------------------------

  @functools.cached_property
  def initial_state(self) -> TrainState:
    """The fresh state (``create_train_state``), built on first use."""
    return self._create_state()

  def restore_or_initialise(self) -> tuple[TrainState, Position]:
    """This workdir's checkpoint (the latest, or ``checkpoint.restore_step``),
    else a fresh (or ``init_from``) state. A checkpoint that fails to restore
    raises; it is never replaced by a fresh start."""
    if self.checkpointer.latest_step() is not None:
      return self._resume()
    if self.config.checkpoint.restore_step != -1:
      raise FileNotFoundError(
        "config.checkpoint.restore_step="
        f"{self.config.checkpoint.restore_step}, but"
        f" {self.checkpointer.directory} holds no checkpoint."
      )
    if self.config.train.init_from:
      return self._initialise_from(self.config.train.init_from), Position()
    return self.initial_state, Position()

  def _resume(self) -> tuple[TrainState, Position]:
    """Restores the checkpoint ``checkpoint.restore_step`` (-1: the latest).

    Resuming from an older step moves the later checkpoints to
    ``<workdir>/checkpoints_superseded/`` (nothing is deleted), so training
    can save those steps again.
    """
    restore_step = self.config.checkpoint.restore_step
    which = "last" if restore_step == -1 else restore_step
    state, metadata = self.checkpointer.restore(which, self.abstract_state)
    step = int(state.step)
    position = self._checked_position(metadata, step)
    if which != "last":
      destination = self.run.superseded_path(
        f"after_step_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
      )
      moved = self.checkpointer.set_aside_after(step, destination)
      if moved:
        logging.warning(
          "Resuming from step %d: moved the later checkpoints %s to %s.",
          step,
          moved,
          destination,
        )
    logging.info(
      "Resuming %s after checkpoint step %d (epoch %d, step %d of %d).",
      self.run.path,
      step,
      position.epoch + 1,
      position.step,
      self.steps_per_epoch,
    )
    return state, position

  def _checked_position(self, metadata: dict[str, Any], step: int) -> Position:
    """The training position saved with the checkpoint at global ``step``,
    checked against the config.

    Raises:
      ValueError: the epoch or the step in the epoch is not an integer, is
        out of range (0 <= epoch <= train.epochs, 0 <= step_in_epoch <
        steps per epoch) or disagrees with ``step``.
    """
    epoch, step_in_epoch = (
      metadata.get("epoch"),
      metadata.get("step_in_epoch"),
    )
    where = f"checkpoint {self.checkpointer.step_path(step)}"
    if not all(
      isinstance(v, int) and not isinstance(v, bool)
      for v in (epoch, step_in_epoch)
    ):
      raise ValueError(
        f"The metadata of {where} has epoch={epoch!r},"
        f" step_in_epoch={step_in_epoch!r}; expected integers."
      )
    epochs, steps_per_epoch = self.config.train.epochs, self.steps_per_epoch
    if not (0 <= epoch <= epochs and 0 <= step_in_epoch < steps_per_epoch):
      raise ValueError(
        f"The metadata of {where} is out of range: epoch={epoch} (allowed 0"
        f" to train.epochs={epochs}), step_in_epoch={step_in_epoch} (allowed"
        f" 0 to {steps_per_epoch - 1}, the steps per epoch less one)."
      )
    if epoch == epochs and step_in_epoch:
      raise ValueError(
        f"The metadata of {where} is past the end of training: epoch={epoch}"
        f" of train.epochs={epochs}, step_in_epoch={step_in_epoch}."
      )
    if epoch * steps_per_epoch + step_in_epoch != step:
      raise ValueError(
        f"The metadata of {where} (epoch={epoch},"
        f" step_in_epoch={step_in_epoch}, {steps_per_epoch} steps per epoch)"
        f" disagrees with its step counter {step}."
      )
    return Position(epoch, step_in_epoch)

  def _initialise_from(self, source_dir: str) -> TrainState:
    """A fresh state (optimiser, step, schedule) with the model weights of
    checkpoint ``train.init_from_checkpoint`` of the run in ``source_dir``.

    "best" (the default) ranks the source's checkpoints by the source's own
    metric (its config.json), as the reference starts adversarial training
    from its best natural model.
    """
    which = parse_init_from_checkpoint(self.config)
    source = RunDirectory(source_dir)
    source_config = (
      source.load_config() if source.config_path.exists() else self.config
    )
    # Only the weights are read: the source may have another optimiser.
    target = {
      "params": self.abstract_state.params,
      "batch_stats": self.abstract_state.batch_stats,
    }
    with source.checkpointer(source_config, read_only=True) as checkpointer:
      restored, _ = checkpointer.restore(which, target, partial=True)
    logging.info(
      "Initialised the model from checkpoint %r of %s.", which, source_dir
    )
    return self.initial_state.replace(**restored)

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
    batch_size = self.config.eval.batch_size
    totals = None
    for batch in tqdm.tqdm(
      data.eval_batches(split, batch_size),
      desc="natural + PGD-20",
      total=-(-len(split) // batch_size),
      unit="batch",
      disable=not is_chief(),
      leave=False,
    ):
      counts = self.eval_step(state, self.parallel.shard(batch))
      jax.block_until_ready(counts)
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
    resumed_step = position.epoch * self.steps_per_epoch + position.step
    self.logger = metric_logging.MetricLogger(
      self.run, resumed_step=resumed_step or None
    )
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
            "Stop requested: saved at epoch %d, step %d of %d. Run the same"
            " command again to resume.",
            position.epoch + (position.step > 0),
            position.step or self.steps_per_epoch,
            self.steps_per_epoch,
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
      disable=not is_chief(),
      leave=False,
    )
    # Throughput over the steps since the last log point (which synced with
    # the device), so only the first window after a start counts compiling.
    window_start, window_steps, steps_run = time.perf_counter(), 0, 0
    for indices in batches:
      state, metrics = self.train_step(
        state, self.device_train, self.parallel.shard(indices)
      )
      # The bar counts finished steps, not dispatched ones (its rate and ETA
      # would otherwise run ahead of the device and stall at the end).
      jax.block_until_ready(metrics)
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
        global_step = epoch * self.steps_per_epoch + position.step
        # The bar shows them; a log line would break it.
        self.logger.write_scalars(
          global_step,
          {
            **{f"train_{k}": v for k, v in host.items()},
            "images_per_second": images_per_second,
            "learning_rate": float(self.learning_rate(global_step - 1)),
          },
          echo=False,
        )
        bar.set_postfix(
          loss=f"{host['loss']:.3f}",
          acc=f"{host['accuracy']:.1f}%",
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
    self.save(state, position, metrics)
    return state, position

  def _host_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}

  def is_trained(self) -> bool:
    """Whether the workdir's last checkpoint ends ``train.epochs``."""
    latest = self.checkpointer.latest_step()
    return latest is not None and latest >= (
      self.config.train.epochs * self.steps_per_epoch
    )

  def is_complete(self) -> bool:
    """Whether the run is trained and, with ``eval.final``, its final
    evaluation's report is written (not only its partial results)."""
    return self.is_trained() and (
      not self.config.eval.final
      or self.run.has_report(final_report_name(self.config))
    )

  def close(self) -> None:
    self.checkpointer.close()
    if self.logger is not None:
      self.logger.close()


def table1_scalars(results: dict) -> dict[str, float]:
  """The headline numbers (%) of a ``cifs_jax.evaluation`` results dict:
  natural accuracy and the worst case of each attack and of all attacks."""
  scalars = {"final/natural": results["natural"]["top1"]}
  for name, attack in results["attacks"].items():
    scalars[f"final/{name}"] = attack["worst_case"]["top1"]
  scalars["final/worst_case"] = results["worst_case"]["top1"]
  return scalars


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains (resuming if ``workdir`` has checkpoints) and evaluates.

  Returns the evaluation of the final state on ``eval.final_num_examples``
  test examples (natural and PGD accuracy, %; also written to the metric
  logs as ``final_check/<name>``); an empty dict if a stop was
  requested before training finished, or if the workdir's run was already
  complete (then nothing runs, unless ``eval.rerun_final``). With
  ``eval.final``, also runs the robustness evaluation of
  ``eval.final_protocol`` (``cifs_jax.evaluation``), writes
  ``eval_<protocol>.json`` / ``.md`` to the workdir and its headline numbers
  (``table1_scalars``) to the metric logs (on several processes: all of them
  evaluate, process 0 writes).
  """
  experiment_config.validate(config)
  run = RunDirectory(workdir)
  check_writable_directory(run.path)
  # Before the data is loaded: a second writer is refused at once.
  with run.locked_for_training():
    trainer = Trainer(config, workdir)
    try:
      return _train_and_evaluate(trainer)
    finally:
      trainer.close()


def _train_and_evaluate(trainer: Trainer) -> dict[str, float]:
  """``train_and_evaluate`` once the workdir is locked."""
  config = trainer.config
  if trainer.is_complete() and not config.eval.rerun_final:
    # Restored all the same: a damaged last checkpoint is an error here
    # too, not a silent "complete".
    trainer.restore_or_initialise()
    logging.info(
      "The run in %s is complete (train.epochs=%d, final report written);"
      " nothing to do. Pass --config.eval.rerun_final=True to evaluate it"
      " again, or a larger --config.train.epochs to train on.",
      trainer.run.path,
      config.train.epochs,
    )
    return {}
  if trainer.is_trained():
    logging.info(
      "The run in %s is trained; finishing its final evaluation.",
      trainer.run.path,
    )
  state = trainer.train()
  if trainer.stop_request:
    return {}
  results = trainer.evaluate(state, config.eval.final_num_examples)
  logging.info(
    "Final state on %d test images: natural %.2f %%, PGD-20 %.2f %%.",
    results["eval_examples"],
    results["natural_accuracy"],
    results["pgd_accuracy"],
  )
  final_step = config.train.epochs * trainer.steps_per_epoch
  trainer.logger.write_scalars(
    final_step, {f"final_check/{k}": v for k, v in results.items()}
  )
  if config.eval.final:
    host_state = trainer.parallel.unreplicate(state)
    report = run_evaluation.evaluate_and_publish(
      config,
      models.build_model(config.model),  # float32 attacks
      host_state.variables,
      trainer.test_split,
      trainer.run.path,
      protocol_name=config.eval.final_protocol,
      num_examples=config.eval.final_num_examples,
      attack_names=config.eval.final_attacks,
      name=final_report_name(config),
      checkpoint=run_evaluation.checkpoint_label(
        config,
        "final state",
        int(host_state.step),
        {"epoch": config.train.epochs},
      ),
    )
    trainer.logger.write_scalars(final_step, table1_scalars(report))
  return results
