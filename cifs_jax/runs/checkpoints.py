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
would restore silently. ``<step>/checksums.json`` holds the sha256 of every
file of the step directory but orbax's commit records (``_CHECKPOINT_METADATA``
and ``commit_success.txt``, which orbax writes while committing). It is part
of the commit: process 0 writes it into the temporary step directory after
every item is finished and before orbax renames that directory into place
(`_checksumming_rename`), so no kill leaves a committed step without it.
``restore`` checks them first and refuses a checkpoint whose files differ,
naming the file. A step without the file (written before checksums existed)
restores with a warning that it cannot be verified. The checksums catch
accidents (flipped bits, truncated or lost files), not tampering: whoever can
write the step can rewrite its checksums too.

A checkpoint directory holds only directories and regular files: a symlink,
FIFO, socket or device anywhere in it is refused, when the directory is
opened and again when a step is hashed, without opening it (a link to
/dev/zero would otherwise be hashed forever, a FIFO block the open).

``read_only=True`` opens an existing directory for reading only (evaluation,
``train.init_from``): nothing is created, and a missing directory is an
error. All processes must call ``save``/``restore``; orbax coordinates
which process writes what.

States of ``jax.pmap`` training carry a leading device axis: unreplicate them
before ``save`` and restore into an unreplicated target.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import numbers
import os
import re
import stat
import tempfile
from typing import Any, Mapping, NoReturn

from absl import logging
from etils import epath

from cifs_jax.parallel import is_chief
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_METRICS_KEY = "metrics"
CHECKSUMS_FILENAME = "checksums.json"
# Written by orbax into the step directory while it commits, after the
# checksums: not covered by them.
_COMMIT_RECORDS = ("_CHECKPOINT_METADATA", "commit_success.txt")
_HASH_CHUNK_BYTES = 1 << 20
# checksums.json lists each file in about 100 bytes; a step has hundreds.
_MAX_CHECKSUMS_BYTES = 1 << 22


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


def _checksumming_rename(
  directory: epath.Path,
) -> type[ocp.path.atomicity.AtomicRenameTemporaryPath]:
  """Orbax's atomic rename of a temporary directory into its final path
  which, for a step directory directly in ``directory``, first writes its
  checksums into it: they are committed with the step.

  Orbax uses the class for the step and for each item inside it; finalize
  runs on the primary process only, items first.
  """

  class ChecksummingRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    async def finalize(self) -> None:
      if self.get_final().parent == directory:
        await asyncio.to_thread(write_checksums, self.get())
      await super().finalize()

  return ChecksummingRename


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
    if directory.is_dir():
      # Orbax reads every step's metrics on opening: refuse links first.
      try:
        _regular_files(directory)
      except CheckpointError as e:
        raise CheckpointError(
          f"Cannot open checkpoint directory {directory}: {e}"
        ) from e

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
      # Deprecated in favour of atomicity_options, which offers no hook.
      temporary_path_class=_checksumming_rename(directory),
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
    self, which: str | int, target: PyTree, partial: bool = False
  ) -> tuple[PyTree, dict[str, Any]]:
    """Reads a checkpoint into the structure of ``target``.

    Args:
      which: "last", "best" (highest ``best_metric``) or a step.
      target: pytree like the saved state whose leaves are ``jax.Array`` or
        ``jax.ShapeDtypeStruct`` (with ``sharding``); the restored arrays take
        their shapes, dtypes and shardings from it.
      partial: ``target`` is a dict of some of the saved state's fields
        (e.g. ``{"params": ..., "batch_stats": ...}``); only those are read
        (the optimiser state, say, is neither read nor checked).

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
    state_args = (
      ocp.args.PyTreeRestore(
        target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      )
      if partial
      else ocp.args.StandardRestore(target)
    )
    args = ocp.args.Composite(
      **{
        _STATE: state_args,
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
    if later and is_chief():
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


def _regular_files(root: epath.Path) -> list[str]:
  """Paths relative to ``root`` of the files under it, which must be regular
  files or directories: anything else (a symlink, FIFO, socket or device) is
  refused from its lstat, without opening it.

  Raises:
    CheckpointError: naming the first such entry.
  """
  root = os.fspath(root)
  files = []
  for folder, folders, names in os.walk(root):
    for name in folders + names:
      path = os.path.join(folder, name)
      mode = os.lstat(path).st_mode
      if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CheckpointError(
          f"{path} is a {_file_kind(mode)}, not a regular file or directory;"
          " a checkpoint holds only those. Remove it (or the step holding it)."
        )
      if stat.S_ISREG(mode):
        files.append(os.path.relpath(path, root))
  return sorted(files)


def _file_kind(mode: int) -> str:
  for test, kind in (
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
  ):
    if test(mode):
      return kind
  return "special file"


def _open_regular(path: str) -> int:
  """A read-only descriptor of ``path``, once it is a regular file: not
  following a symlink nor blocking on a FIFO swapped in since its lstat."""
  fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise CheckpointError(f"{path} is a {_file_kind(mode)}, not a file.")
  return fd


def _file_digests(step_dir: epath.Path) -> dict[str, str]:
  """{path relative to ``step_dir``: sha256 hex} of its files but the
  checksums file.

  Raises:
    CheckpointError: the step holds something other than regular files and
      directories.
  """
  digests = {}
  for relative in _regular_files(step_dir):
    if relative == CHECKSUMS_FILENAME:
      continue
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(os.path.join(step_dir, relative)), "rb") as f:
      while chunk := f.read(_HASH_CHUNK_BYTES):
        digest.update(chunk)
    digests[relative] = digest.hexdigest()
  return digests


def write_checksums(step_dir: epath.Path) -> None:
  """Writes ``<step_dir>/checksums.json`` (sha256 of each file but orbax's
  commit records), atomically: through a fresh temporary file in the same
  directory."""
  digests = _file_digests(step_dir)
  for record in _COMMIT_RECORDS:
    digests.pop(record, None)
  text = json.dumps({"algorithm": "sha256", "files": digests}, indent=1)
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


def _read_checksums(path: epath.Path) -> dict[str, str]:
  """The {relative path: sha256 hex} of a checksums file, read from a regular
  file of at most `_MAX_CHECKSUMS_BYTES`.

  Raises:
    CheckpointError: naming the file, if it is anything else.
  """
  try:
    with os.fdopen(_open_regular(os.fspath(path)), "rb") as f:
      text = f.read(_MAX_CHECKSUMS_BYTES + 1)
    if len(text) > _MAX_CHECKSUMS_BYTES:
      raise ValueError(f"more than {_MAX_CHECKSUMS_BYTES} bytes")
    content = json.loads(text)
    if not isinstance(content, dict) or content.get("algorithm") != "sha256":
      raise ValueError('not an object with "algorithm": "sha256"')
    files = content.get("files")
    if not (
      isinstance(files, dict)
      and all(
        isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)
        for digest in files.values()
      )
    ):
      raise ValueError('"files" is not an object of sha256 hex digests')
  except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError.
    raise CheckpointError(
      f"Cannot read {path}: {type(e).__name__}: {_shorten(e)}."
    ) from e
  return files


def verify_checksums(step_dir: epath.Path) -> None:
  """Checks every file of a step directory against its ``checksums.json``.

  Raises:
    CheckpointError: naming each file that changed, is missing or was added,
      or the checksums file if it is unreadable, or an entry of the step
      that is not a regular file or directory.
  """
  checksums_path = step_dir / CHECKSUMS_FILENAME
  if not os.path.lexists(checksums_path):
    logging.warning(
      "%s has no %s: cannot verify its files.", step_dir, CHECKSUMS_FILENAME
    )
    return
  expected = _read_checksums(checksums_path)
  actual = _file_digests(step_dir)
  for record in _COMMIT_RECORDS:
    if record not in expected:  # Listed by the versions that wrote them after.
      actual.pop(record, None)
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
