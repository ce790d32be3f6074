"""Tests of cifs_jax.training.metric_logging.MetricLogger."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax.training import metric_logging
from tests.event_files import read_scalar_events


def test_scalars_round_trip_through_jsonl_and_tensorboard(tmp_path):
  with metric_logging.MetricLogger(tmp_path, is_chief=True) as logger:
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
    with metric_logging.MetricLogger(tmp_path, is_chief=True) as logger:
      logger.write_scalars(step, {"loss": float(step)})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  assert sorted(e[0] for e in read_scalar_events(tmp_path / "tensorboard")) == [
    1,
    2,
  ]


def test_step_is_reserved(tmp_path):
  with metric_logging.MetricLogger(tmp_path, is_chief=True) as logger:
    with pytest.raises(ValueError, match="reserved"):
      logger.write_scalars(1, {"step": 3.0})


def test_non_chief_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metric_logging.MetricLogger(workdir, is_chief=False) as logger:
    logger.write_scalars(1, {"loss": 1.0})
  assert not workdir.exists()


def test_chief_defaults_to_process_zero(tmp_path):
  with metric_logging.MetricLogger(tmp_path) as logger:
    assert logger.is_chief
