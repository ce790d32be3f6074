"""Smoke runs of the benchmark scripts: tiny CIFS ResNet-18, one timed step,
JSON written to a temporary directory."""

import json

import pytest

from benchmarks import evaluate, side_by_side, train_step

SMOKE = ["--smoke", "--defense", "cifs", "--attack-steps", "1"]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_side_by_side_reports_the_jax_over_pytorch_ratio(tmp_path, capsys):
  output = tmp_path / "side_by_side.json"
  side_by_side.main([*SMOKE, "--case", "pgd10_at", "--output", str(output)])
  (row,) = read_json(output)["results"]
  assert row["case"] == "pgd10_at" and row["batch_size"] == 8
  assert row["ratio_jax_over_torch"] == pytest.approx(
    row["jax_median_s"] / row["torch_median_s"], rel=1e-2
  )
  assert row["jax_compile_s"] > 0 and row["jax_flops"] > 0
  environment = read_json(output)["environment"]
  assert {"torch", "jax", "load_average_before", "load_average_after"} <= set(
    environment
  )
  assert "JAX vs PyTorch" in capsys.readouterr().out


@pytest.mark.parametrize("script", [train_step, evaluate])
def test_throughput_scripts_report_flops_and_images_per_second(
  script, tmp_path, capsys
):
  output = tmp_path / "out.json"
  script.main([*SMOKE, "--output", str(output)])
  results = read_json(output)
  row, memory = results["results"]["8"]
  assert row["defense"] == "cifs" and row["flops_per_run"] > 0
  images = results["config"].get("images", 8)  # train_step: one batch
  assert row["images_per_s"] == pytest.approx(
    1000 * images / row["ms_per_run"], rel=2e-2
  )
  assert memory["peak_memory_bytes"] > 0
  assert "img/s" in capsys.readouterr().out
