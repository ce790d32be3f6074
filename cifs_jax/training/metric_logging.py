"""Scalar metrics to TensorBoard, JSON lines and the log.

``MetricLogger(workdir)`` writes, on the chief process only:

* ``<workdir>/metrics.jsonl``: one JSON object per ``write_scalars`` call,
  ``{"step": <int>, "<name>": <float>, ...}``, appended across restarts (a
  resumed run may repeat the steps logged after its last checkpoint; readers
  keep the last line per step). Non-finite values are written as ``NaN`` /
  ``Infinity``, which Python's ``json`` reads back.
* ``<workdir>/tensorboard/events.out.tfevents.*``: TensorBoard scalar events,
  written with tensorboardX, which needs no TensorFlow. (clu's
  ``metric_writers`` imports TensorFlow unconditionally, so it is not used.)
* an absl ``logging.info`` line per call (unless ``echo=False``).

Accuracies are percentages everywhere (training and evaluation).
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Mapping

from absl import logging
import jax
import tensorboardX

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


class MetricLogger:
  """Writes scalar metrics per step; a no-op on non-chief processes."""

  def __init__(
    self, workdir: str | os.PathLike[str], is_chief: bool | None = None
  ):
    """Opens (appending) the metric files in ``workdir``.

    Args:
      workdir: local run directory; created if missing.
      is_chief: whether this process writes; defaults to
        ``jax.process_index() == 0``.
    """
    if is_chief is None:
      is_chief = jax.process_index() == 0
    self.is_chief = is_chief
    if not is_chief:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(
      workdir / METRICS_FILENAME, "a", buffering=1
    )  # Line-buffered.
    # tensorboardX names files events.out.tfevents.<seconds>.<host>, opened
    # with "wb": a unique suffix keeps a restart within a second from
    # truncating the previous file.
    self._tensorboard = tensorboardX.SummaryWriter(
      logdir=str(workdir / TENSORBOARD_DIRNAME),
      filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}",
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
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, global_step=int(step))
    if echo:
      logging.info(
        "[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items())
      )

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.is_chief:
      self._jsonl.close()
      self._tensorboard.close()

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
