"""A training run's directory (the ``--workdir``): what lives where in it.

  <workdir>/config.json        the run's config (``save_config``)
  <workdir>/checkpoints/       Orbax checkpoints (``checkpointer``)
  <workdir>/checkpoints_superseded/<name>/
                               checkpoints set aside when a run resumes from
                               an older step (``superseded_path``)
  <workdir>/metrics.jsonl      scalar metrics, one JSON object per line
                               (``metrics_path``; ``metric_logging``)
  <workdir>/tensorboard/       TensorBoard event files (``tensorboard_path``)
  <workdir>/<name>.json, .md   evaluation reports (``report_path``), e.g.
                               ``eval_paper.json`` of the final evaluation
  <workdir>/<name>.partial.json  an evaluation in progress
  <workdir>/analysis/          ``python -m cifs_jax.analyze``'s outputs
  <workdir>/.lock              held (``fcntl.flock``) by the process training
                               in the workdir (``locked_for_training``)

This module is the only one that names these files. Paths may be relative
or start with ``~``; they are made absolute once, here.

Training (``cifs_jax.main``) and evaluation (``cifs_jax.evaluate``) both open
a run through ``RunDirectory``; the rules that tie a run to its config live
here too: which keys may not change on resume (``RESUME_KEYS``) and which
metric ranks the checkpoints (``best_metric``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import ml_collections

from cifs_jax import experiment_config
from cifs_jax.parallel import is_chief
from cifs_jax.training import methods
from cifs_jax.runs.checkpoints import Checkpointer, absolute_path

CONFIG_FILENAME = "config.json"
LOCK_FILENAME = ".lock"
METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
ANALYSIS_DIRNAME = "analysis"
REPORT_PREFIX = "eval_"
PARTIAL_SUFFIX = ".partial.json"
CHECKPOINTS_DIRNAME = "checkpoints"
SUPERSEDED_DIRNAME = "checkpoints_superseded"
# Config keys (and everything below them) that define the model being trained.
MODEL_KEYS = ("model", "data.name")
# Keys that must not change when a run is resumed: the model, the data and
# what fixes the data order and the step count of an epoch.
RESUME_KEYS = MODEL_KEYS + ("seed", "train.batch_size", "train.max_examples")


def best_metric(config: ml_collections.ConfigDict) -> str:
  """The per-epoch evaluation metric that ranks a run's checkpoints."""
  return methods.METHODS[config.train.method].best_metric


def final_report_name(config: ml_collections.ConfigDict) -> str:
  """The name of the report of a run's final evaluation, e.g. "eval_paper"."""
  return f"{REPORT_PREFIX}{config.eval.final_protocol}"


def evaluation_report_name(
  protocol: str, checkpoint: str, cascade: bool = False
) -> str:
  """The name of a report of ``python -m cifs_jax.evaluate``, e.g.
  "eval_paper_last" ("eval_paper_cascade_last" for ``--cascade``)."""
  mode = "_cascade" if cascade else ""
  return f"{REPORT_PREFIX}{protocol}{mode}_{checkpoint}"


def partial_results_path(directory: str | os.PathLike, name: str) -> str:
  """``<directory>/<name>.partial.json``: an evaluation's finished runs."""
  return os.path.join(directory, name + PARTIAL_SUFFIX)


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL such as ``gs://bucket/run`` (not checked locally)."""
  return "://" in os.fspath(path)


def check_writable_directory(path: str | os.PathLike) -> None:
  """Checks that directory ``path`` exists and a file can be written there,
  or that it can be created (its nearest existing ancestor is a directory
  where a file can be written). Creates nothing that stays; remote paths
  (``gs://...``) are not checked.

  Raises:
    NotADirectoryError: ``path``, or the ancestor it would be created in, is
      a file (the message names both).
    OSError: no file can be written there (e.g. PermissionError; the message
      names the directory and the reason).
  """
  if is_remote(path):
    return
  path = str(absolute_path(path))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    problem = "is" if existing == path else f"cannot be created: {existing} is"
    raise NotADirectoryError(f"{path} {problem} a file, not a directory.")
  try:  # os.access would not see a read-only file system, nor root's rights
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    where = "" if existing == path else f" (to be created in {existing})"
    raise type(e)(f"{path}{where} is not writable: {e.strerror or e}.") from e


def make_writable_directory(path: str | os.PathLike) -> str:
  """``check_writable_directory``, then creates ``path`` (with its
  parents) if it is missing and local; returns it as a string."""
  check_writable_directory(path)
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
  return path


class RunInUseError(RuntimeError):
  """Another process is training in the run directory."""


class RunDirectory:
  """The files of one training run (see the module docstring)."""

  def __init__(self, path: str | os.PathLike):
    self.path = absolute_path(path)

  @property
  def config_path(self) -> epath.Path:
    return self.path / CONFIG_FILENAME

  @property
  def checkpoints_path(self) -> epath.Path:
    return self.path / CHECKPOINTS_DIRNAME

  @property
  def metrics_path(self) -> epath.Path:
    return self.path / METRICS_FILENAME

  @property
  def tensorboard_path(self) -> epath.Path:
    return self.path / TENSORBOARD_DIRNAME

  @property
  def analysis_path(self) -> epath.Path:
    return self.path / ANALYSIS_DIRNAME

  def report_paths(self) -> list[epath.Path]:
    """The finished evaluation reports ``eval_*.json``, sorted by name."""
    return sorted(
      path
      for path in self.path.glob(f"{REPORT_PREFIX}*.json")
      if not path.name.endswith(PARTIAL_SUFFIX)
    )

  def report_path(self, name: str, suffix: str) -> epath.Path:
    """``<workdir>/<name><suffix>``, e.g. ("eval_paper", ".json")."""
    return self.path / f"{name}{suffix}"

  def has_report(self, name: str) -> bool:
    """Whether the report ``<name>.json`` was written (and no evaluation of
    that name is left unfinished in ``<name>.partial.json``)."""
    return (
      self.report_path(name, ".json").exists()
      and not self.report_path(name, PARTIAL_SUFFIX).exists()
    )

  @contextlib.contextmanager
  def locked_for_training(self) -> Iterator[None]:
    """Holds an exclusive lock on ``<workdir>/.lock`` inside the block
    (process 0 only), so two trainings never write one workdir. The kernel
    releases it when the process dies; readers (evaluation) take no lock.

    Raises:
      RunInUseError: another process holds the lock.
    """
    if not is_chief():
      yield
      return
    self.path.mkdir(parents=True, exist_ok=True)
    lock_path = self.path / LOCK_FILENAME
    with open(lock_path, "a") as lock_file:
      try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        raise RunInUseError(
          f"Another process is training in {self.path} (it holds"
          f" {lock_path}). Wait for it to finish or stop it; two trainings"
          " must not write one workdir. Evaluating the run needs no lock."
        ) from None
      try:
        yield
      finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)

  def superseded_path(self, name: str) -> epath.Path:
    """``<workdir>/checkpoints_superseded/<name>``."""
    return self.path / SUPERSEDED_DIRNAME / name

  def checkpointer(
    self,
    config: ml_collections.ConfigDict,
    *,
    read_only: bool = False,
    **kwargs: Any,
  ) -> Checkpointer:
    """The run's checkpoints, ranked by ``best_metric(config)``.

    Args:
      config: the run's config.
      read_only: open existing checkpoints for reading only; creates nothing.
      **kwargs: more ``Checkpointer`` arguments.

    Raises:
      FileNotFoundError: ``read_only`` and the run directory or its
        ``checkpoints/`` does not exist.
    """
    if read_only and not self.path.is_dir():
      raise FileNotFoundError(
        f"Run directory {self.path} does not exist (nothing was created)."
      )
    return Checkpointer(
      self.checkpoints_path,
      best_metric=best_metric(config),
      read_only=read_only,
      **kwargs,
    )

  def load_config(self) -> ml_collections.ConfigDict:
    """The config the run saved: its values over ``base_config()``."""
    if not self.config_path.exists():
      raise FileNotFoundError(
        f"{self.config_path} does not exist: pass --config, or point "
        "--workdir at a training run's directory."
      )
    try:
      saved = json.loads(self.config_path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"Cannot parse {self.config_path}: {e}.") from e
    config = experiment_config.base_config()
    config.update(ml_collections.ConfigDict(saved))
    return config

  def save_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json`` (process 0 only), never truncated.

    The text goes to a fresh temporary file in the same directory, renamed
    into place; values that are not JSON types are written as strings.
    """
    if not is_chief():
      return
    text = _config_as_json(config)
    if self.config_path.exists() and self.config_path.read_text() == text:
      return  # Unchanged: the file is left untouched.
    self.path.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(
      prefix=CONFIG_FILENAME + ".", suffix=".tmp", dir=self.path
    )
    try:
      with os.fdopen(handle, "w") as f:
        f.write(text)
      os.replace(tmp, self.config_path)
    except BaseException:
      os.unlink(tmp)
      raise

  def check_compatible(
    self, config: ml_collections.ConfigDict, keys: Sequence[str] = RESUME_KEYS
  ) -> None:
    """Refuses to resume with a config that changes the model or data order.

    Compares ``config`` with the saved ``config.json`` (a run without one
    passes) on every key equal to or below one of ``keys`` (dotted paths:
    "model" covers "model.cifs.topk"). Other keys may differ, e.g. a larger
    ``train.epochs`` to extend a run.

    Raises:
      ValueError: listing each differing key with its saved and new value.
    """
    if not self.config_path.exists():
      return
    try:
      old = _flatten(json.loads(self.config_path.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(
        f"Cannot parse {self.config_path} ({e}); it should hold the config "
        f"of the run in {self.path}. Fix or remove it to resume."
      ) from e
    new = _flatten(json.loads(_config_as_json(config)))
    missing = "<missing>"
    changed = {
      key: (old.get(key, missing), new.get(key, missing))
      for key in sorted(set(old) | set(new))
      if old.get(key, missing) != new.get(key, missing)
    }
    covered = lambda key: any(key == k or key.startswith(k + ".") for k in keys)
    refused = {k: v for k, v in changed.items() if covered(k)}
    if refused:
      lines = "\n".join(
        f"  {key}: {before!r} (saved) -> {after!r} (new)"
        for key, (before, after) in refused.items()
      )
      raise ValueError(
        f"The config differs from the one saved in {self.config_path} in "
        f"keys that change the model or the data order ({', '.join(keys)})"
        f":\n{lines}\nUse a new workdir, or set these keys back to their "
        "saved values to resume."
      )
    if changed:
      logging.info(
        "Resuming %s with config changes: %s", self.path, ", ".join(changed)
      )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _config_as_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)
