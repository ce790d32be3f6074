"""Smoke runs of the benchmark scripts: tiny CIFS ResNet-18, one timed step,
JSON written to a temporary directory."""

import functools
import json

import chex
import jax
from jax import lax
import pytest

from benchmarks import (
  autoattack,
  convolutions,
  evaluate,
  profile_step,
  side_by_side,
  train_step,
)

SMOKE = ["--smoke", "--defense", "cifs", "--attack-steps", "1"]


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
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


@pytest.mark.parametrize(
  "script",
  [
    pytest.param(train_step, marks=pytest.mark.slow),
    pytest.param(evaluate, marks=pytest.mark.long),
  ],
)
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


@pytest.mark.slow
def test_profile_splits_the_step_into_its_convolutions_and_the_rest(
  tmp_path, capsys
):
  output = tmp_path / "profile.json"
  profile_step.main([*SMOKE, "--batch-size", "8", "--output", str(output)])
  (row,) = read_json(output)["results"]
  floor = row["jax_convolution_floor"]
  assert floor["untimed"] == 0 and floor["convolutions"] >= floor["distinct"]
  assert all(floor["by_kind"][k] > 0 for k in profile_step.CONVOLUTION_KINDS)
  assert floor["seconds"] == pytest.approx(
    sum(floor["by_kind"].values()), rel=1e-3
  )
  # The attack needs input gradients only; the update needs both.
  assert floor["by_phase"]["attack: convolution input gradient"] > 0
  assert "attack: convolution weight gradient" not in floor["by_phase"]
  assert floor["by_phase"]["update: convolution weight gradient"] > 0
  assert row["jax_other_ops_traced"]["by_category"]["batch norm"] > 0
  assert row["torch_seconds_per_step"]["convolution"] > 0
  assert "its convolutions" in capsys.readouterr().out


@pytest.mark.parametrize("stride", [1, 2])
def test_a_compiled_convolution_runs_alone_as_it_ran_in_its_program(stride):
  conv = functools.partial(
    lax.conv_general_dilated,
    window_strides=(stride, stride),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  text = jax.jit(conv).lower(x, w).compile().as_text()
  instructions, callers = profile_step.parse_hlo(text)
  (name,) = profile_step.convolutions(instructions, callers)
  run, operands = profile_step.standalone_convolution(
    instructions[name], instructions
  )
  assert [o.shape for o in operands] == [x.shape, w.shape]
  chex.assert_trees_all_close(run(x, w), conv(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_autoattack_scales_each_component_to_its_full_budget(tmp_path, capsys):
  output = tmp_path / "autoattack.json"
  autoattack.main(["--smoke", "--output", str(output)])
  measured = read_json(output)["results"]
  components = measured["components"]
  assert list(components) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  # The standard budgets: 100 steps, 9 targets x 100, 9 x 100, 5,000 queries.
  assert [c["full_iterations"] for c in components.values()] == [
    100,
    900,
    900,
    5000,
  ]
  assert all(c["timed_iterations"] == 1 for c in components.values())
  per_1000 = {n: c["full_s_per_1000_images"] for n, c in components.items()}
  assert per_1000["square"] == pytest.approx(
    components["square"]["timed_s"] * 5000 * 1000 / 2, rel=1e-3
  )
  assert measured["standard_s_per_1000_images_all_robust"] == pytest.approx(
    sum(per_1000.values()), rel=1e-3
  )
  assert "standard AutoAttack" in capsys.readouterr().out


def test_convolutions_time_every_stage_and_computation(tmp_path, capsys):
  output = tmp_path / "convolutions.json"
  results = convolutions.main(["--smoke", "--output", str(output)])
  assert read_json(output)["totals"] == results["totals"]
  rows = results["results"]
  assert len(rows) == len(convolutions.STAGES) * 3
  for computation in convolutions.COMPUTATIONS:
    total = results["totals"][f"b2 {computation}"]
    assert total["jax_s"] == pytest.approx(
      sum(r["jax_s"] for r in rows if r["computation"] == computation),
      rel=1e-3,
    )
  assert "convolutions, JAX / PyTorch" in capsys.readouterr().out
