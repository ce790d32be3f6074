"""Tests of cifs_jax.runs.metric_logging.MetricLogger."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax.runs import directory as run_directory
from cifs_jax.runs import metric_logging
from cifs_jax.runs.directory import RunDirectory
from tests.event_files import read_scalar_events


def test_scalars_round_trip_through_jsonl_and_tensorboard(tmp_path):
  with metric_logging.MetricLogger(
    RunDirectory(tmp_path), is_chief=True
  ) as logger:
    logger.write_scalars(1, {"train/loss": jnp.float32(2.5), "train/acc": 0.25})
    logger.write_scalars(2, {"eval/pgd_accuracy": np.float64(0.5125)})

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 1, "train/loss": 2.5, "train/acc": 0.25},
    {"step": 2, "eval/pgd_accuracy": 0.5125},
  ]
  events = read_scalar_events(tmp_path / "tensorboard")
  assert events == [
    (1, "train/loss", 2.5),
    (1, "train/acc", 0.25),
    (2, "eval/pgd_accuracy", pytest.approx(0.5125)),  # Stored as float32.
  ]


def test_appends_across_restarts(tmp_path):
  for step in (1, 2):
    with metric_logging.MetricLogger(
      RunDirectory(tmp_path), is_chief=True
    ) as logger:
      logger.write_scalars(step, {"loss": float(step)})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  assert sorted(e[0] for e in read_scalar_events(tmp_path / "tensorboard")) == [
    1,
    2,
  ]


def test_step_is_reserved(tmp_path):
  with metric_logging.MetricLogger(
    RunDirectory(tmp_path), is_chief=True
  ) as logger:
    with pytest.raises(ValueError, match="reserved"):
      logger.write_scalars(1, {"step": 3.0})


def test_non_chief_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metric_logging.MetricLogger(
    RunDirectory(workdir), is_chief=False
  ) as logger:
    logger.write_scalars(1, {"loss": 1.0})
  assert not workdir.exists()


@pytest.mark.parametrize("process_index,is_chief", [(0, True), (1, False)])
def test_chief_defaults_to_process_zero(
  tmp_path, monkeypatch, process_index, is_chief
):
  monkeypatch.setattr(jax, "process_index", lambda: process_index)
  with metric_logging.MetricLogger(RunDirectory(tmp_path)) as logger:
    logger.write_scalars(1, {"loss": 1.0})
  assert logger.is_chief == is_chief
  assert (tmp_path / run_directory.METRICS_FILENAME).exists() == is_chief


def test_nothing_is_created_before_the_first_write(tmp_path):
  workdir = tmp_path / "run"
  with metric_logging.MetricLogger(RunDirectory(workdir), is_chief=True):
    pass
  assert not workdir.exists()


def test_a_resumed_run_drops_the_lines_past_its_checkpoint(tmp_path):
  """Steps 1-6 were logged, the process died after the checkpoint at step
  4 (mid-line), and the run resumed from it: steps 5 and 6 are logged once,
  by the resumed run."""
  path = tmp_path / run_directory.METRICS_FILENAME
  path.write_text(
    "".join(
      json.dumps({"step": s, "loss": 10.0 + s}) + "\n" for s in range(1, 7)
    )
    + '{"step": 7, "lo'
  )
  with metric_logging.MetricLogger(
    RunDirectory(tmp_path), is_chief=True, resumed_step=4
  ) as logger:
    for step in (5, 6):
      logger.write_scalars(step, {"loss": float(step)})
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(l["step"], l["loss"]) for l in lines] == [
    (1, 11.0),
    (2, 12.0),
    (3, 13.0),
    (4, 14.0),
    (5, 5.0),
    (6, 6.0),
  ]
  events = sorted(read_scalar_events(tmp_path / "tensorboard"))
  assert [(step, value) for step, _, value in events] == [(5, 5.0), (6, 6.0)]


def test_a_damaged_metrics_line_is_named(tmp_path):
  path = tmp_path / run_directory.METRICS_FILENAME
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  logger = metric_logging.MetricLogger(
    RunDirectory(tmp_path), is_chief=True, resumed_step=1
  )
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
    logger.write_scalars(2, {"loss": 1.0})
