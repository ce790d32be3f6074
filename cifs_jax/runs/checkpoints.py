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
SIGTERM save.

Orbax stores no checksum of the array data, so flipped bits of the same length
would restore silently. Once a save is committed (in ``wait_until_finished``,
which every later ``save``, ``restore`` and ``close`` calls first), process 0
writes ``<step>/checksums.json``: the sha256 of every file of the step
directory. ``restore`` checks them first and refuses a checkpoint whose files
differ, naming the file. A step without the file (written before checksums
existed, or by a process killed between the commit and the checksums) restores
with a warning that it cannot be verified.

``read_only=True`` opens an existing directory for reading only (evaluation,
``train.init_from``): nothing is created, and a missing directory is an
error. All processes must call ``save``/``restore``; orbax coordinates
which process writes what.

States of ``jax.pmap`` training carry a leading device axis: unreplicate them
before ``save`` and restore into an unreplicated target.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
from typing import Any, Mapping, NoReturn

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_METRICS_KEY = "metrics"
CHECKSUMS_FILENAME = "checksums.json"
_HASH_CHUNK_BYTES = 1 << 20


def absolute_path(path: str | os.PathLike) -> epath.Path:
  """``path`` with ``~`` expanded and, for a local path, made absolute against
  the current directory (Orbax refuses relative paths); a URL such as
  ``gs://bucket/run`` is returned as it is."""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


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
    read_only: bool = False,
  ):
    """Opens (creating if needed, unless ``read_only``) a checkpoint directory.

    Args:
      directory: where the step directories live.
      max_to_keep: number of most recent checkpoints to keep (>= 1); the best
        one is kept in addition when it is older.
      best_metric: key of ``metrics`` (in ``save``) ranking checkpoints; higher
        is better.
      async_save: write in a background thread (see the module docstring).
      read_only: only read: create nothing, and refuse ``save``.

    Raises:
      FileNotFoundError: ``read_only`` and ``directory`` does not exist.
      CheckpointError: the directory holds an unreadable step.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    directory = absolute_path(directory)
    if read_only and not directory.is_dir():
      raise FileNotFoundError(
        f"Checkpoint directory {directory} does not exist (opened for reading"
        " only; nothing was created)."
      )
    self.best_metric = best_metric
    self.read_only = read_only
    self._steps_without_checksums: set[int] = set()

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
      read_only=read_only,
      create=not read_only,
      # Saving is off when read-only; 0 says so without orbax's warning.
      save_interval_steps=0 if read_only else 1,
    )
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
    if self.read_only:
      raise ValueError(
        f"{self.directory} was opened read-only; cannot save step {step}."
      )
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
    self._steps_without_checksums.add(step)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is on disk.

    Raises:
      CheckpointError: that save failed; the checkpoints before it are intact.
    """
    step = self.latest_step()
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._steps_without_checksums.clear()
      self._raise_save_error(step, e)
    committed = self._steps_without_checksums & set(self.all_steps())
    self._steps_without_checksums.clear()
    if jax.process_index() == 0:
      for saved in sorted(committed):
        write_checksums(self.step_path(saved))

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
      CheckpointError: a file differs from its checksum, or the checkpoint is
        unreadable (corrupt or truncated) or does not match ``target``.
        Nothing falls back to a fresh start.
    """
    self.wait_until_finished()
    step = self._resolve(which)
    path = self.step_path(step)
    try:
      verify_checksums(path)
    except CheckpointError as e:
      raise CheckpointError(
        f"Cannot restore checkpoint {path}: {e} {self._alternatives(step)}"
      ) from e
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardRestore(target),
        _METADATA: ocp.args.JsonRestore(),
      }
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
        f"Cannot restore checkpoint {path}: {type(e).__name__}:"
        f" {_shorten(e)}\nThe checkpoint is corrupt or truncated, or does not"
        " match the target state (did the model config change?). Not"
        f" starting from scratch. {self._alternatives(step)}"
      ) from e
    return restored[_STATE], dict(restored[_METADATA])

  def _alternatives(self, step: int) -> str:
    """How to go on without the damaged checkpoint at ``step``."""
    others = [s for s in self.all_steps() if s != step]
    if not others:
      return (
        f"{self.directory} holds no other checkpoint (steps {self.all_steps()})"
        ": restore a copy, or start a new run in a new workdir."
      )
    return (
      f"Existing steps: {self.all_steps()}. To resume from another"
      f" checkpoint, restore one of steps {others} explicitly (training:"
      " --config.checkpoint.restore_step=STEP), or move"
      f" {self.step_path(step)} out of {self.directory} and restart."
    )

  def set_aside_after(
    self, step: int, destination: epath.PathLike
  ) -> list[int]:
    """Moves the checkpoints after ``step`` into ``destination``, so training
    can resume from ``step`` and save those steps again; returns their steps.

    Nothing is deleted: each ``<directory>/<s>`` becomes ``destination/<s>``.

    Raises:
      FileExistsError: ``destination/<s>`` exists already.
    """
    self.wait_until_finished()
    later = [s for s in self.all_steps() if s > step]
    destination = epath.Path(destination)
    for moved in later:
      if (destination / str(moved)).exists():
        raise FileExistsError(
          f"Cannot set aside checkpoint {self.step_path(moved)}:"
          f" {destination / str(moved)} exists already."
        )
    if later and jax.process_index() == 0:
      destination.mkdir(parents=True, exist_ok=True)
      for moved in later:
        self.step_path(moved).rename(destination / str(moved))
    self._manager.reload()
    return later

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


def parse_which(which: str | int) -> str | int:
  """ "best", "last", a step (int) or its ASCII digits -> what to restore.

  Raises:
    ValueError: anything else (e.g. "²", which passes ``str.isdigit``).
  """
  if which in ("best", "last"):
    return which
  if isinstance(which, numbers.Integral) and not isinstance(which, bool):
    if which >= 0:
      return int(which)
  elif isinstance(which, str) and which.isascii() and which.isdigit():
    return int(which)
  raise ValueError(f"expected 'best', 'last' or a step number, got {which!r}.")


def _file_digests(step_dir: epath.Path) -> dict[str, str]:
  """{path relative to ``step_dir``: sha256 hex} of its files but the
  checksums file."""
  root = os.fspath(step_dir)
  digests = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, root)
      if relative == CHECKSUMS_FILENAME:
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
          digest.update(chunk)
      digests[relative] = digest.hexdigest()
  return dict(sorted(digests.items()))


def write_checksums(step_dir: epath.Path) -> None:
  """Writes ``<step_dir>/checksums.json`` (sha256 of each file), atomically:
  through a fresh temporary file in the same directory."""
  text = json.dumps(
    {"algorithm": "sha256", "files": _file_digests(step_dir)}, indent=1
  )
  handle, tmp = tempfile.mkstemp(
    prefix=CHECKSUMS_FILENAME + ".", suffix=".tmp", dir=os.fspath(step_dir)
  )
  try:
    with os.fdopen(handle, "w") as f:
      f.write(text)
    os.replace(tmp, os.fspath(step_dir / CHECKSUMS_FILENAME))
  except BaseException:
    os.unlink(tmp)
    raise


def verify_checksums(step_dir: epath.Path) -> None:
  """Checks every file of a step directory against its ``checksums.json``.

  Raises:
    CheckpointError: naming each file that changed, is missing or was added,
      or the checksums file if it is unreadable.
  """
  checksums_path = step_dir / CHECKSUMS_FILENAME
  if not checksums_path.exists():
    logging.warning(
      "%s has no %s: cannot verify its files.", step_dir, CHECKSUMS_FILENAME
    )
    return
  try:
    expected = json.loads(checksums_path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"Cannot read {checksums_path}: {type(e).__name__}: {_shorten(e)}."
    ) from e
  actual = _file_digests(step_dir)
  problems = [
    f"  {name}: "
    + (
      "missing"
      if name not in actual
      else "not in the checksums"
      if name not in expected
      else "sha256 differs"
    )
    for name in sorted(set(expected) | set(actual))
    if expected.get(name) != actual.get(name)
  ]
  if problems:
    raise CheckpointError(
      "the checkpoint is corrupt or truncated: its files differ from"
      f" {checksums_path}:\n" + "\n".join(problems) + "\nNot starting from"
      " scratch."
    )


def _shorten(error: Exception, limit: int = 500) -> str:
  """First ``limit`` characters of an error message (TensorStore's are long)."""
  text = str(error)
  return text if len(text) <= limit else text[:limit] + " ..."
