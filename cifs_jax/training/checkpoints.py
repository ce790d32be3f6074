"""Checkpoints of the training state (docs/design.md §8).

``Checkpointer`` wraps one orbax ``CheckpointManager``. Each checkpoint is a
step directory ``<directory>/<step>/`` holding two items:

* ``state``: the train-state pytree (params, batch_stats, opt_state, step, the
  RNG key as raw ``uint32`` key data, ...), written with orbax's standard
  PyTree handler (OCDBT + zarr via TensorStore);
* ``metadata``: a JSON object (epoch, data position, ...) plus ``"metrics"``,
  the metrics dict passed to ``save``.

Orbax writes each step into a temporary directory and renames it into place
when every item is committed, so a crash mid-save never leaves a step
directory that looks finished, and old steps are deleted only after the new
one is committed. Retention uses orbax's preservation policies (orbax 0.12.8):
``AnyPreservationPolicy([LatestN(max_to_keep), BestN(n=1)])`` keeps the last
``max_to_keep`` checkpoints plus the single best by ``best_metric`` (higher is
better). ``BestN`` runs with ``keep_checkpoints_without_metrics=False``, so a
checkpoint saved without the metric (e.g. on SIGTERM mid-epoch) is kept only
while it is among the last ``max_to_keep``, and is never a candidate for best.
``best_fn`` is set as well because orbax writes the per-step metrics (and
answers ``best_step``) only when it is.

Saves are asynchronous by default: ``save`` returns once the arrays are copied
off the device and writing continues in a background thread. Call
``wait_until_finished`` (or ``close``) before the process exits, e.g. after a
SIGTERM save. All processes must call ``save``/``restore``; orbax coordinates
which process writes what.

States of ``jax.pmap`` training carry a leading device axis: unreplicate them
before ``save`` and restore into an unreplicated target.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Mapping, NoReturn

from absl import logging
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_METRICS_KEY = "metrics"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read back."""


class Checkpointer:
  """Saves and restores the train state; keeps the last n and the best one.

  Example::

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore("last", state)
    ...
    ckpt.save(step, state, metadata={"epoch": epoch}, metrics=eval_metrics)
    ...
    ckpt.close()
  """

  def __init__(
    self,
    directory: str | epath.PathLike,
    *,
    max_to_keep: int = 3,
    best_metric: str = "pgd_accuracy",
    async_save: bool = True,
  ):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the step directories live.
      max_to_keep: number of most recent checkpoints to keep (>= 1); the best
        one is kept in addition when it is older.
      best_metric: key of ``metrics`` (in ``save``) ranking checkpoints; higher
        is better.
      async_save: write in a background thread (see the module docstring).
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self.best_metric = best_metric

    def rank(metrics: Mapping[str, float]) -> float:
      return metrics.get(best_metric, -math.inf)

    options = ocp.CheckpointManagerOptions(
      best_fn=rank,
      best_mode="max",
      preservation_policy=preservation_policy.AnyPreservationPolicy(
        [
          preservation_policy.LatestN(n=max_to_keep),
          preservation_policy.BestN(
            get_metric_fn=rank,
            n=1,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      ),
      enable_async_checkpointing=async_save,
    )
    directory = epath.Path(directory)
    try:
      # Reads every step's metrics, so one corrupt step fails here.
      self._manager = ocp.CheckpointManager(
        directory, item_names=(_STATE, _METADATA), options=options
      )
    except Exception as e:  # pylint: disable=broad-except
      entries = (
        sorted(p.name for p in directory.iterdir())
        if directory.is_dir()
        else []
      )
      raise CheckpointError(
        f"Cannot open checkpoint directory {directory}: {type(e).__name__}:"
        f" {_shorten(e)}\nIf it is a read error, a step directory in it (one"
        f" of {entries}) is corrupt, e.g. a truncated metrics file. Not"
        " starting from scratch: move the damaged step out of the directory"
        " to resume from the others."
      ) from e

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def step_path(self, step: int) -> epath.Path:
    """Directory of the checkpoint at ``step``."""
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints (and of a save in flight),
    ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Most recent step, or None if the directory holds no checkpoint."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the highest ``best_metric``, or None if none has it.

    Waits for the save in flight, whose metrics are read back from disk.
    """
    self.wait_until_finished()
    step = self._manager.best_step()
    if step is None or self.best_metric not in (
      self._manager.metrics(step) or {}
    ):
      return None
    return step

  def save(
    self,
    step: int,
    state: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
  ) -> None:
    """Starts saving a checkpoint at ``step`` (see ``wait_until_finished``).

    Args:
      step: checkpoint step, larger than every existing one (e.g. the global
        step). Saving at an existing step raises instead of overwriting it.
      state: pytree of ``jax.Array`` leaves (numpy arrays and Python scalars
        are accepted too).
      metadata: JSON-serialisable dict, e.g. epoch and data position; the key
        ``"metrics"`` is reserved.
      metrics: scalar metrics of this checkpoint, stored in the metadata. The
        checkpoint competes for "best" iff ``metrics[best_metric]`` is finite.

    Raises:
      ValueError: ``step`` is not after the latest checkpoint, or the metadata
        is not JSON-serialisable or uses the reserved key.
      CheckpointError: this save, or the previous asynchronous one, failed.
        Earlier checkpoints are untouched.
    """
    self.wait_until_finished()
    if step in self.all_steps():
      raise ValueError(
        f"A checkpoint already exists at step {step} ({self.step_path(step)});"
        " refusing to overwrite it."
      )
    latest = self.latest_step()
    if latest is not None and step < latest:
      raise ValueError(
        f"Checkpoint steps must increase: asked to save step {step} but the"
        f" latest checkpoint in {self.directory} is step {latest}."
      )
    metadata = dict(metadata or {})
    if _METRICS_KEY in metadata:
      raise ValueError(
        f"metadata key {_METRICS_KEY!r} is reserved; pass metrics=."
      )
    metadata[_METRICS_KEY] = {k: float(v) for k, v in (metrics or {}).items()}
    try:
      json.dumps(metadata)
    except TypeError as e:
      raise ValueError(
        f"Checkpoint metadata is not JSON-serialisable: {e}"
      ) from e

    value = metadata[_METRICS_KEY].get(self.best_metric)
    ranking = None
    if value is not None and math.isfinite(value):
      ranking = {self.best_metric: value}
    elif value is not None:
      logging.warning(
        "Step %d: %s = %s is not finite; not a candidate for best.",
        step,
        self.best_metric,
        value,
      )
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(state),
        _METADATA: ocp.args.JsonSave(metadata),
      }
    )
    try:
      self._manager.save(step, args=args, metrics=ranking, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(step, e)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is on disk.

    Raises:
      CheckpointError: that save failed; the checkpoints before it are intact.
    """
    step = self.latest_step()
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(step, e)

  def _raise_save_error(self, step: int | None, error: Exception) -> NoReturn:
    # A failed save may have dropped steps from orbax's in-memory list (those
    # it was about to delete) or left the failed step in it: re-read the disk.
    self._manager.reload()
    raise CheckpointError(
      f"Saving checkpoint step {step} to {self.directory} failed:"
      f" {type(error).__name__}: {_shorten(error)}. The previous checkpoints"
      f" are intact: steps {self.all_steps()}."
    ) from error

  def restore(
    self, which: str | int, target: PyTree
  ) -> tuple[PyTree, dict[str, Any]]:
    """Reads a checkpoint into the structure of ``target``.

    Args:
      which: "last", "best" (highest ``best_metric``) or a step.
      target: pytree like the saved state whose leaves are ``jax.Array`` or
        ``jax.ShapeDtypeStruct`` (with ``sharding``); the restored arrays take
        their shapes, dtypes and shardings from it.

    Returns:
      (state, metadata): state with the structure of ``target``; metadata is
      the dict given to ``save`` plus ``"metrics"``.

    Raises:
      FileNotFoundError: there is no such checkpoint (the message lists what
        exists).
      CheckpointError: the checkpoint is unreadable (corrupt or truncated) or
        does not match ``target``. Nothing falls back to a fresh start.
    """
    self.wait_until_finished()
    step = self._resolve(which)
    path = self.step_path(step)
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardRestore(target),
        _METADATA: ocp.args.JsonRestore(),
      }
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
        f"Cannot restore checkpoint {path}: {type(e).__name__}:"
        f" {_shorten(e)}\nThe checkpoint is corrupt or truncated, or does not"
        " match the target state (did the model config change?). Not"
        " starting from scratch. To resume from another checkpoint, restore"
        f" one of steps {others} explicitly, or move {path} out of"
        f" {self.directory} and restart."
      ) from e
    return restored[_STATE], dict(restored[_METADATA])

  def _resolve(self, which: str | int) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoints in {self.directory}.")
    if which == "last":
      return steps[-1]
    if which == "best":
      best = self.best_step()
      if best is None:
        raise FileNotFoundError(
          f"No checkpoint in {self.directory} has metric"
          f" {self.best_metric!r}; existing steps: {steps}."
        )
      return best
    if isinstance(which, numbers.Integral) and not isinstance(which, bool):
      if which not in steps:
        raise FileNotFoundError(
          f"No checkpoint at step {which} in {self.directory}; existing"
          f" steps: {steps}."
        )
      return int(which)
    raise ValueError(f"which must be 'last', 'best' or a step, got {which!r}.")

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's resources."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _shorten(error: Exception, limit: int = 500) -> str:
  """First ``limit`` characters of an error message (TensorStore's are long)."""
  text = str(error)
  return text if len(text) <= limit else text[:limit] + " ..."
