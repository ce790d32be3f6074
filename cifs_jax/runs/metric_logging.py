"""Scalar metrics to TensorBoard, JSON lines and the log.

``MetricLogger(run)`` writes to a ``RunDirectory``, on the chief process
only:

* ``<workdir>/metrics.jsonl``: one JSON object per ``write_scalars`` call,
  ``{"step": <int>, "<name>": <float>, ...}``, appended across restarts.
  Non-finite values are written as ``NaN`` / ``Infinity``, which Python's
  ``json`` reads back.
* ``<workdir>/tensorboard/events.out.tfevents.*``: TensorBoard scalar events,
  written with tensorboardX, which needs no TensorFlow. (clu's
  ``metric_writers`` imports TensorFlow unconditionally, so it is not used.)
* an absl ``logging.info`` line per call (unless ``echo=False``).

Nothing is created before the first ``write_scalars``, so a run that has
nothing to do leaves its workdir as it was. A run resumed from the checkpoint
at step S passes ``resumed_step=S``: the lines of metrics.jsonl past S (logged
after that checkpoint by the process that died) are dropped, and TensorBoard
purges its events past S, so every step is logged once.

Accuracies are percentages everywhere (training and evaluation).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import uuid
from typing import Mapping

from absl import logging
import tensorboardX

from cifs_jax import parallel
from cifs_jax.runs.directory import RunDirectory


class MetricLogger:
  """Writes scalar metrics per step; a no-op on non-chief processes."""

  def __init__(
    self,
    run: RunDirectory,
    is_chief: bool | None = None,
    resumed_step: int | None = None,
  ):
    """Prepares the metric files of ``workdir``, opened at the first write.

    Args:
      run: a local run directory; created at the first write if missing.
      is_chief: whether this process writes; defaults to
        ``parallel.is_chief()`` (process 0).
      resumed_step: the global step of the checkpoint a resumed run restored;
        lines past it are dropped (see the module docstring).
    """
    if is_chief is None:
      is_chief = parallel.is_chief()
    self.is_chief = is_chief
    self.metrics_path = pathlib.Path(run.metrics_path)
    self.tensorboard_path = pathlib.Path(run.tensorboard_path)
    self.resumed_step = resumed_step
    self._jsonl = None
    self._tensorboard = None

  def _open(self) -> None:
    self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    path = self.metrics_path
    if self.resumed_step is not None and path.exists():
      _drop_lines_after(path, self.resumed_step)
    self._jsonl = open(path, "a", buffering=1)  # Line-buffered.
    # tensorboardX names files events.out.tfevents.<seconds>.<host>, opened
    # with "wb": a unique suffix keeps a restart within a second from
    # truncating the previous file.
    self._tensorboard = tensorboardX.SummaryWriter(
      logdir=str(self.tensorboard_path),
      filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}",
      purge_step=(None if self.resumed_step is None else self.resumed_step + 1),
    )

  def write_scalars(
    self, step: int, scalars: Mapping[str, float], echo: bool = True
  ) -> None:
    """Records ``scalars`` (name -> number, incl. 0-d arrays) at ``step``;
    ``echo``: also log them (off while a progress bar is drawn)."""
    if not self.is_chief:
      return
    if "step" in scalars:
      raise ValueError('"step" is reserved for the step in metrics.jsonl.')
    values = {name: float(value) for name, value in scalars.items()}
    if self._jsonl is None:
      self._open()
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, global_step=int(step))
    if echo:
      logging.info(
        "[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items())
      )

  def close(self) -> None:
    """Flushes and closes the files (if any were opened)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._tensorboard.close()
      self._jsonl = self._tensorboard = None

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _drop_lines_after(path: pathlib.Path, step: int) -> None:
  """Rewrites metrics.jsonl without its lines whose step is past ``step``
  (a temporary file renamed into place; unchanged if there are none).

  Raises:
    ValueError: naming the file and line, for a line that is not a JSON
      object with an integer "step".
  """
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      line_step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if number == len(lines) and not line.endswith("\n"):
        continue  # A line cut short by the crash being resumed from.
      raise ValueError(
        f"{path}, line {number}: not a metrics line ({e}); fix or move the"
        " file to resume."
      ) from e
    if line_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return
  handle, tmp = tempfile.mkstemp(
    prefix=path.name + ".", suffix=".tmp", dir=path.parent
  )
  with os.fdopen(handle, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
