"""The analysis tools (issue 15): channel statistics against hand-computed
values, the figures' pixel sizes, and the report's numbers against the JSON
they come from.

The default tests use hand-set models and hand-written run files (seconds);
``test_commands_on_a_smoke_run`` (slow) trains ``fmnist_resnet10.py:smoke``
and runs ``python -m cifs_jax.analyze`` and ``python -m cifs_jax.report`` on
it.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cifs_jax import experiment_config, models
from cifs_jax.analysis import (
  channels,
  class_analysis,
  features,
  paper_results,
  plots,
  reproduction,
  run_figures,
  runs,
)
from cifs_jax.evaluation import protocols, report, summary
from cifs_jax.evaluation.evaluator import protocol_runs
from cifs_jax.runs.directory import RunDirectory
from tests.idx_files import write_tiny_fashion_mnist

# ----------------------------------------------------- channel statistics


def test_channel_statistics_hand_computed():
  # Three examples, four channels (spatial means).
  means = np.array(
    [
      [2.0, 0.03, 0.0, -1.0],  # largest 2: threshold 0.02
      [1.0, 0.5, 0.009, 0.0],  # largest 1: threshold 0.01 (0.009 is below)
      [0.0, 0.0, 0.0, 0.0],  # no channel active
    ]
  )
  weights = np.array([0.1, -0.5, 0.7, 0.1])
  stats = channels.class_channel_statistics(means, weights)
  # Descending weight; the tie between channels 0 and 3 keeps index order.
  np.testing.assert_array_equal(stats.order, [2, 0, 3, 1])
  np.testing.assert_allclose(stats.weights, [0.7, 0.1, 0.1, -0.5])
  # Mean |spatial mean| per channel: c0 3/3, c1 0.53/3, c2 0.009/3, c3 1/3.
  np.testing.assert_allclose(stats.magnitude, [0.009 / 3, 1.0, 1 / 3, 0.53 / 3])
  # Activated: c0 in ex0, ex1; c1 in ex0, ex1; c2 never; c3 in ex0.
  np.testing.assert_allclose(stats.frequency, [0.0, 2 / 3, 1 / 3, 2 / 3])


def test_activation_threshold_is_relative_to_each_example():
  # Channel 1 is 1.2 % of example 0's largest and 1.5 % of example 1's.
  magnitudes = np.array([[100.0, 1.2, 0.5], [1.0, 0.015, 0.005]])
  frequency = lambda threshold: channels.activation_frequency(
    magnitudes, threshold
  )
  np.testing.assert_allclose(frequency(0.01), [1.0, 1.0, 0.0])
  # Strictly above: 1.2 is not above 1.2 % of 100.
  np.testing.assert_allclose(frequency(0.012), [1.0, 0.5, 0.0])
  np.testing.assert_allclose(frequency(0.02), [1.0, 0.0, 0.0])


def test_statistics_refuse_mismatched_channels():
  with pytest.raises(ValueError, match="class_weights"):
    channels.class_channel_statistics(np.ones((2, 3)), np.ones(4))


# ------------------------------------------------- features of a model


def tiny_resnet10(defense: str):
  """ResNet-10, width 1 (8 channels in layer4), CIFS/CAS at the authors'
  points (layer3.0, layer4.0)."""
  config = models.default_config()
  config.name, config.width, config.defense = "resnet10", 1, defense
  config.cifs.mlp_hidden = 4
  return models.build_model(config)


def hand_set_variables(model, block_bias, probe_kernel, probe_bias, kernel):
  """Every parameter zero but layer4_0's bn2 bias (so its output is
  relu(block_bias) everywhere, for any input), the last CIFS layer's linear
  probe and the last linear layer; batch statistics mean 0, variance 1."""
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
  )
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape), tree)
  params = zeros(variables["params"])
  params["layer4_0"]["bn2"]["bias"] = jnp.asarray(block_bias)
  params["linear"]["kernel"] = jnp.asarray(kernel)
  if "cifs_layer4_0" in params:
    head = params["cifs_layer4_0"]["probe"]["head"]
    head["kernel"], head["bias"] = jnp.asarray(probe_kernel), probe_bias
  batch_stats = jax.tree_util.tree_map_with_path(
    lambda path, a: (jnp.ones if path[-1].key == "var" else jnp.zeros)(a.shape),
    variables["batch_stats"],
  )
  return {"params": params, "batch_stats": batch_stats}


@pytest.fixture
def hand_set_cifs():
  rng = np.random.default_rng(0)
  block_bias = np.array([0.5, -1.0, 2.0, 0.001, 1.0, 0.0, 3.0, 0.02])
  probe_kernel = rng.normal(size=(8, 10)).astype(np.float32)
  probe_bias = jnp.zeros(10)
  kernel = rng.normal(size=(8, 10)).astype(np.float32)
  model = tiny_resnet10("cifs")
  variables = hand_set_variables(
    model, block_bias, probe_kernel, probe_bias, kernel
  )
  return model, variables, block_bias, probe_kernel, kernel


def test_cifs_channel_means_of_a_hand_set_model(hand_set_cifs):
  model, variables, block_bias, probe_kernel, kernel = hand_set_cifs
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  means = jax.jit(features.channel_means, static_argnums=0)(model, variables, x)
  assert set(means) == set(features.CIFS_SITES)
  before = np.maximum(block_bias, 0)  # relu(bias) at every position
  # Linear probe on the pooled features: logits = before @ W; the top-2
  # classes' weight columns summed are the relevance (Eq. 1).
  top2 = np.argsort(-(before @ probe_kernel))[:2]
  relevance = probe_kernel[:, top2].sum(axis=1)
  mask = np.exp(relevance) / np.exp(relevance).sum()
  for row in range(3):
    np.testing.assert_allclose(means["before_mask"][row], before, rtol=1e-5)
    np.testing.assert_allclose(
      means["after_mask"][row], before * mask, rtol=1e-5, atol=1e-7
    )
  # The last CIFS layer feeds the head: its output is the penultimate layer.
  _, state = model.apply(variables, x, mutable=["intermediates"])
  np.testing.assert_allclose(
    state["intermediates"]["penultimate"][0],
    means["after_mask"],
    rtol=1e-5,
    atol=1e-7,
  )
  # Figures 1/3 for class 3: hand-sorted weights, 1 % threshold.
  stats = channels.class_channel_statistics(means["before_mask"], kernel[:, 3])
  np.testing.assert_array_equal(stats.order, np.argsort(-kernel[:, 3]))
  # Largest magnitude 3: channels above 0.03 are 0, 2, 4, 6 (not 0.02, 0.001).
  active = np.array([1, 0, 1, 0, 1, 0, 1, 0], float)
  np.testing.assert_allclose(stats.frequency, active[stats.order])


@pytest.mark.parametrize("defense", ["none", "cas"])
def test_plain_models_give_their_penultimate_features(defense):
  model = tiny_resnet10(defense)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  means = jax.jit(features.channel_means, static_argnums=0)(model, variables, x)
  assert list(means) == ["penultimate"]
  # Independent truth: the head's input recovered from its output.
  logits, _ = jax.jit(model.apply)(variables, x)
  params = variables["params"]["linear"]
  np.testing.assert_allclose(
    means["penultimate"] @ params["kernel"] + params["bias"],
    logits,
    rtol=1e-5,
    atol=1e-6,
  )


def test_analyze_class_on_a_hand_set_model(hand_set_cifs):
  """The whole pipeline: every example has the same features (the model
  ignores its input), so natural and adversarial statistics agree."""
  from cifs_jax import data

  model, variables, block_bias, _, kernel = hand_set_cifs
  rng = np.random.default_rng(0)
  split = data.Split(
    rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8),
    np.array([0, 3] * 6, np.int32),
    10,
  )
  examples = class_analysis.class_examples(split, 3, 5)
  assert len(examples) == 5 and set(examples.labels.tolist()) == {3}
  attack = class_analysis.paper_attack("pgd20", 0.1)
  analysis = class_analysis.analyze_class(
    model, variables, examples, 3, attack, batch_size=4
  )
  assert analysis["num_examples"] == 5
  for site in features.CIFS_SITES:
    natural = analysis["statistics"][site]["natural"]
    adversarial = analysis["statistics"][site]["adversarial"]
    np.testing.assert_array_equal(natural.order, np.argsort(-kernel[:, 3]))
    np.testing.assert_allclose(natural.magnitude, adversarial.magnitude)
  before = analysis["statistics"]["before_mask"]["natural"]
  np.testing.assert_allclose(
    before.magnitude, np.maximum(block_bias, 0)[before.order], rtol=1e-5
  )


# ------------------------------------------------ run files and figures


def png_size(path) -> tuple[int, int]:
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size


def fake_results(seed: int, num_probes: int = 2) -> dict:
  """An evaluation's results dict from random true-class ranks."""
  rng = np.random.default_rng(seed)
  protocol = protocols.paper_protocol(0.1).select(["fgsm", "pgd20"])
  all_runs = protocol_runs(protocol, num_probes)
  n = 40
  ranks = lambda: rng.integers(1, 4, (n, 1 + num_probes))
  return summary.summarize(
    protocol,
    all_runs,
    labels=rng.integers(0, 10, n),
    clean_ranks=ranks(),
    run_ranks={run.name: ranks() for run in all_runs},
    num_classes=10,
    class_names=[f"class {c}" for c in range(10)],
  )


def write_fake_run(directory: pathlib.Path, defense: str, seed: int) -> dict:
  """config.json, metrics.jsonl (2 epochs of 4 steps) and eval_paper.json."""
  config = experiment_config.base_config()
  config.model.defense = defense
  run = RunDirectory(directory)
  run.save_config(config)
  rows = [
    {"step": 2, "train_loss": 2.0, "train_accuracy": 10.0},
    {"step": 4, "train_loss": 1.5, "train_accuracy": 30.0},
    {"step": 4, "epoch": 1, "natural_accuracy": 40.0, "pgd_accuracy": 20.0},
    {"step": 6, "train_loss": 1.2, "train_accuracy": 40.0},
    {"step": 6, "train_loss": 1.1, "train_accuracy": 45.0},  # resumed: kept
    {"step": 8, "epoch": 2, "natural_accuracy": 50.0, "pgd_accuracy": 25.0},
  ]
  (directory / "metrics.jsonl").write_text(
    "\n".join(json.dumps(r) for r in rows) + "\n"
  )
  results = fake_results(seed, num_probes=0 if defense == "none" else 2)
  report.write_json(results, str(directory / "eval_paper.json"))
  return results


@pytest.fixture
def fake_runs(tmp_path):
  results = {}
  for name, defense, seed in (("vanilla", "none", 1), ("cifs", "cifs", 2)):
    results[name] = write_fake_run(tmp_path / name, defense, seed)
  return tmp_path, results


def test_training_curves_from_metrics(fake_runs):
  directory, _ = fake_runs
  curves = runs.training_curves(runs.read_metrics(directory / "cifs"))
  np.testing.assert_allclose(curves["loss_epoch"], [0.5, 1.0, 1.5])
  np.testing.assert_allclose(curves["loss"], [2.0, 1.5, 1.1])
  np.testing.assert_allclose(curves["epoch"], [1, 2])
  np.testing.assert_allclose(curves["pgd_accuracy"], [20, 25])
  np.testing.assert_allclose(curves["natural_accuracy"], [40, 50])


def test_figures_have_their_pixel_size(fake_runs, tmp_path):
  directory, _ = fake_runs
  workdirs = [directory / "vanilla", directory / "cifs"]
  path = run_figures.per_class_figure(workdirs, "pgd20", tmp_path / "pc.png")
  assert png_size(path) == plots.PER_CLASS_SIZE
  path = run_figures.training_curves_figure(workdirs, tmp_path / "tc.png")
  assert png_size(path) == plots.TRAINING_CURVES_SIZE
  assert (
    run_figures.per_class_figure(workdirs, "cw", tmp_path / "x.png") is None
  )
  stats = channels.class_channel_statistics(
    np.abs(np.random.default_rng(0).normal(size=(5, 16))), np.arange(16.0)
  )
  path = plots.plot_channel_panel(
    {site: {"natural": stats, "adversarial": stats} for site in ("a", "b")},
    "title",
    tmp_path / "channels.png",
  )
  width, height = plots.CHANNEL_PANEL_COLUMN_SIZE
  assert png_size(path) == (2 * width, height)


def markdown_table(markdown: str, section: str) -> list[list[str]]:
  """The cells of the first table after the heading ``section`` (header,
  separator, body rows)."""
  lines = markdown.split(f"## {section}", 1)[1].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  table = []
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    table.append([cell.strip() for cell in line.strip("|").split("|")])
  return table


def markdown_rows(markdown: str, section: str) -> list[list[str]]:
  """The body rows of the first table after the heading ``section``."""
  return markdown_table(markdown, section)[2:]


def test_partial_results_are_not_reports(fake_runs):
  """An evaluation in progress leaves ``<name>.partial.json`` beside the
  finished reports; the report command must not read it as one."""
  workdir = fake_runs[0] / "cifs"
  (workdir / "eval_strong_last.partial.json").write_text(
    '{"fingerprint": {}, "runs": {}}'
  )
  assert list(runs.eval_reports(workdir)) == ["eval_paper"]


def test_report_numbers_equal_the_json(fake_runs, tmp_path):
  directory, results = fake_runs
  out = tmp_path / "out" / "report.md"
  markdown = reproduction.build_report(
    [directory / "vanilla", directory / "cifs"], out
  )
  assert out.read_text() == markdown
  table1 = {row[0]: row for row in markdown_rows(markdown, "Table 1")}
  for name, expected in results.items():
    row = table1[name]
    assert row[1] == "eval_paper"
    accuracies = [
      expected["natural"]["top1"],
      expected["attacks"]["fgsm"]["worst_case"]["top1"],
      expected["attacks"]["pgd20"]["worst_case"]["top1"],
      expected["worst_case"]["top1"],
    ]
    assert [float(v) for v in row[2:-2]] == [round(a, 2) for a in accuracies]
    # 40 examples; the largest standard error is that of the accuracy
    # nearest 50 %.
    assert row[-2] == "40"
    nearest_half = min(accuracies, key=lambda a: abs(a - 50)) / 100
    assert float(row[-1]) == round(
      100 * np.sqrt(nearest_half * (1 - nearest_half) / 40), 2
    )
  topk = markdown_rows(markdown, "Table 4")
  pgd = next(r for r in topk if r[0] == "cifs" and r[2] == "PGD-20")
  worst = results["cifs"]["attacks"]["pgd20"]["worst_case"]
  assert [float(v) for v in pgd[3:]] == [
    round(worst[f"top{k}"], 2) for k in (1, 2, 3)
  ]
  table5_header = markdown_table(markdown, "Table 5")[0]
  assert table5_header[4:] == ["final", "probe0", "probe1"]
  per_beta = results["cifs"]["attacks"]["pgd20"]["per_beta"]
  assert f"| {per_beta['inf/probe1']:.2f} |" in markdown
  # Embedded figures exist, relative to the report.
  images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
  assert len(images) == 3  # per class (pgd20, natural), training curves
  for image in images:
    assert png_size(out.parent / image)[0] > 0


def test_a_cascade_is_reported_by_its_stages(fake_runs, tmp_path):
  """A cascade's per-attack numbers count only the examples each run was
  given: the report shows its stages in the cascade's order (strongest
  first), only its worst case in Table 1, and leaves it out of the
  per-beta_atk, top-k and Table 5 sections, the per-class figure and the
  paper comparison."""
  directory, results = fake_runs
  workdir = directory / "cifs"
  cascade = fake_results(3)
  cascade["stages"] = {"clean": 70.0, "pgd20": 45.0, "fgsm": 40.0}
  cascade["worst_case"]["top1"] = 40.0
  cascade["cascade"] = {"runs": {}, "stages": {}}
  report.write_json(cascade, str(workdir / "eval_a_cascade.json"))
  assert runs.main_report(runs.eval_reports(workdir))[0] == "eval_paper"
  markdown = reproduction.build_report([workdir], tmp_path / "report.md")
  table1 = {row[1]: row for row in markdown_rows(markdown, "Table 1")}
  natural = round(cascade["natural"]["top1"], 2)
  assert table1["eval_a_cascade"][2:6] == [f"{natural:.2f}", "-", "-", "40.00"]
  assert markdown_rows(markdown, "Cascades") == [
    [
      "cifs",
      "eval_a_cascade",
      "clean 70.00 → PGD-20 45.00 → FGSM 40.00",
      str(cascade["num_examples"]),
    ]
  ]
  for section in ("Table 4", "Table 5"):
    assert "eval_a_cascade" not in {
      row[1] for row in markdown_rows(markdown, section)
    }
  assert "/ eval_a_cascade" not in markdown


def test_report_has_the_final_check_and_the_checklist(fake_runs, tmp_path):
  """The trainer's final check (metrics.jsonl) with its standard error, and
  a checklist report in its own section, not read as an evaluation."""
  directory, _ = fake_runs
  workdir = directory / "cifs"
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(
      json.dumps(
        {
          "step": 8,
          "final_check/natural_accuracy": 80.0,
          "final_check/pgd_accuracy": 50.0,
          "final_check/eval_examples": 10000.0,
        }
      )
      + "\n"
    )
  check = {
    "number": 11,
    "name": "Square fools no example the white-box attacks leave robust",
    "reference": "Carlini et al. 2019",
    "verdict": "warn",
    "explanation": "Square fooled 3 examples.",
    "figures": {"square_only": 3},
  }
  # The checklist's layout: its checks beside its attacks' results dict.
  report.write_json(
    {"run": {}, "settings": {}, "checks": [check], "attacks": fake_results(3)},
    str(workdir / "eval_checklist_last.json"),
  )
  evaluations, checklists = runs.read_reports(workdir)
  assert list(evaluations) == ["eval_paper"]
  assert list(checklists) == ["eval_checklist_last"]
  assert list(runs.eval_reports(workdir)) == ["eval_paper"]
  markdown = reproduction.build_report(
    [directory / "vanilla", workdir], tmp_path / "r.md"
  )
  # sqrt(0.8 * 0.2 / 10000) = 0.4 and sqrt(0.5 * 0.5 / 10000) = 0.5 points.
  assert markdown_rows(markdown, "Final check of training") == [
    ["cifs", "10000", "80.00 ± 0.40", "50.00 ± 0.50"]
  ]
  assert markdown_rows(markdown, "Gradient-masking checklist") == [
    [
      "cifs",
      "eval_checklist_last",
      "11",
      check["name"],
      "warn",
      check["explanation"],
    ]
  ]
  assert [row[1] for row in markdown_rows(markdown, "Table 1")] == [
    "eval_paper",
    "eval_paper",
  ]
  runs_table = {row[0]: row for row in markdown_rows(markdown, "Runs")}
  assert runs_table["cifs"][-1] == "eval_paper, eval_checklist_last"


def test_report_sets_the_paper_beside_matching_runs(fake_runs, tmp_path):
  directory, results = fake_runs
  # base_config is the paper's CIFAR-10 ResNet-18 PGD-AT setting.
  markdown = reproduction.build_report([directory / "cifs"], tmp_path / "r.md")
  rows = markdown_rows(markdown, "Beside the paper")
  paper = paper_results.PUBLISHED[("cifar10", "resnet18", "cifs", "pgd_at")]
  ours_like_paper, published, difference, ours_worst_case = rows
  assert "min over beta_atk" in ours_like_paper[1]
  assert published[2:] == ["83.86", "58.86", "51.23", "50.16", "48.70"]
  assert "per-example worst case" in ours_worst_case[1]
  # The paper's comparator: the lowest of the separate per-beta_atk attacks,
  # compared like with like; the per-example worst case is never higher.
  pgd20 = results["cifs"]["attacks"]["pgd20"]
  lowest_run = min(pgd20["per_beta"].values())
  assert float(ours_like_paper[4]) == pytest.approx(lowest_run, abs=0.006)
  assert float(difference[4]) == pytest.approx(
    lowest_run - paper.accuracies["pgd20"], abs=0.006
  )
  worst = pgd20["worst_case"]["top1"]
  assert float(ours_worst_case[4]) == pytest.approx(worst, abs=0.006)
  assert worst <= lowest_run
  assert ours_like_paper[5:] == ["-", "-"]  # C&W and PGD-100 not evaluated
  assert ours_like_paper[2] == ours_worst_case[2]  # the same natural


def test_the_paper_is_compared_with_our_min_over_beta(fake_runs, tmp_path):
  """The paper's PGD-20 column (51.23) is the lowest of its separate
  per-beta_atk attacks: compared with ours in that sense (47.50), not with
  our per-example worst case (41.25), which is shown beside it."""
  directory, results = fake_runs
  cifs = results["cifs"]
  cifs["attacks"]["pgd20"]["min_over_beta"] = 47.5
  cifs["attacks"]["pgd20"]["worst_case"]["top1"] = 41.25
  report.write_json(cifs, str(directory / "cifs" / "eval_paper.json"))
  markdown = reproduction.build_report([directory / "cifs"], tmp_path / "r.md")
  rows = {row[1]: row for row in markdown_rows(markdown, "Beside the paper")}
  like_paper = "ours, min over beta_atk (as the paper)"
  assert rows[f"{like_paper} (eval_paper)"][4] == "47.50"
  assert rows[f"{like_paper} - paper"][4] == "-3.73"
  assert rows["ours, per-example worst case (eval_paper)"][4] == "41.25"


def test_setting_names_non_paper_cifs_variants():
  config = experiment_config.apply_variants(
    experiment_config.base_config(), "sigmoid,top1"
  )
  setting = runs.run_setting(config)
  assert setting["defense"] == "cifs-sigmoid-top1"
  assert setting["train_examples"] == "all"  # max_examples = -1
  config.train.max_examples = 10_000
  assert runs.run_setting(config)["train_examples"] == 10_000
  assert paper_results.published(setting) is None
  assert math.isclose(
    paper_results.published(
      runs.run_setting(experiment_config.base_config())
    ).accuracies["natural"],
    83.86,
  )


# ------------------------------------------------- commands, smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """``fmnist_resnet10.py:smoke`` with a minimal final evaluation (FGSM on
  64 test examples), on synthetic Fashion-MNIST files (256 training, 160
  test examples, 16 of each class): the commands read any run alike, so
  this runs without Debian's copy."""
  from tests import test_training_e2e as e2e

  data_dir = write_tiny_fashion_mnist(
    tmp_path_factory.mktemp("data"), num_train=256, num_test=160
  )
  workdir = tmp_path_factory.mktemp("smoke")
  config = e2e.load_config(
    "fmnist_resnet10",
    "smoke",
    "--config.eval.final_attacks=fgsm",
    f"--config.data.data_dir={data_dir}",
  )
  e2e.trainer_lib.train_and_evaluate(config, str(workdir))
  return workdir


def run_command(*args: str) -> str:
  """Runs ``python -m <args>`` in the repository; returns its stdout."""
  import subprocess
  import sys

  from tests import test_training_e2e as e2e

  result = subprocess.run(
    [sys.executable, "-m", *args],
    cwd=e2e.REPO,
    env={**e2e.subprocess_env(""), "JAX_NUM_CPU_DEVICES": "1"},
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_commands_on_a_smoke_run(smoke_run, tmp_path):
  """analyze writes the channel panel (2 columns: before/after the mask),
  its numbers and the comparison figures; report's Table 1 equals the
  run's eval JSON and embeds the channel figure."""
  stdout = run_command(
    "cifs_jax.analyze",
    f"--workdir={smoke_run}",
    "--class=Trouser",
    "--attack=fgsm",
    "--num_examples=16",
  )
  assert "class 'Trouser': 16 examples" in stdout
  analysis = smoke_run / "analysis"
  width, height = plots.CHANNEL_PANEL_COLUMN_SIZE
  assert png_size(analysis / "channels_Trouser_fgsm.png") == (2 * width, height)
  numbers = json.loads((analysis / "channels_Trouser_fgsm.json").read_text())
  assert numbers["class_index"] == 1 and numbers["num_examples"] == 16
  stats = numbers["statistics"]["after_mask"]["natural"]
  assert len(stats["order"]) == 64  # layer4 of the width-8 ResNet-10
  assert stats["weights"] == sorted(stats["weights"], reverse=True)
  saved = np.load(analysis / "channels_Trouser_fgsm.npz")
  assert saved["adversarial/before_mask"].shape == (16, 64)
  assert png_size(analysis / "per_class_fgsm.png") == plots.PER_CLASS_SIZE
  assert png_size(analysis / "training_curves.png") == (
    plots.TRAINING_CURVES_SIZE
  )

  out = tmp_path / "report.md"
  run_command("cifs_jax.report", "--runs", str(smoke_run), "--out", str(out))
  markdown = out.read_text()
  results = json.loads((smoke_run / "eval_paper.json").read_text())
  (row,) = markdown_rows(markdown, "Table 1")
  assert row[1] == "eval_paper"
  accuracies = [
    results["natural"]["top1"],
    results["attacks"]["fgsm"]["worst_case"]["top1"],
    results["worst_case"]["top1"],
  ]
  assert [float(v) for v in row[2:-2]] == [round(a, 2) for a in accuracies]
  num_examples = results["num_examples"]
  largest_error = max(
    reproduction.standard_error(a, num_examples) for a in accuracies
  )
  assert row[-2:] == [str(num_examples), f"{largest_error:.2f}"]
  assert "channels_Trouser_fgsm.png" in markdown


def test_the_evaluation_reports_table_names_the_checkpoint_briefly(
  fake_runs, tmp_path
):
  """One short cell per field of the report's ``run`` entry that a reader
  needs (checkpoint, eps, date, commit), not a blob of every label."""
  directory, results = fake_runs
  label = {
    "eps": 0.1,
    "checkpoint": {"which": "last", "step": 8, "epoch": 2},
    "date": "2026-12-03T10:00:00+00:00",
    "git_commit": "0123456789abcdef",
    "device": "2 x cpu (cpu)",
  }
  report.write_json(
    {**results["cifs"], "run": label}, str(directory / "cifs/eval_paper.json")
  )
  markdown = reproduction.build_report([directory / "cifs"], tmp_path / "r.md")
  header, _, *rows = markdown_table(markdown, "Evaluation reports")
  assert header[-4:] == ["checkpoint", "eps", "date", "commit"]
  assert rows[0][-4:] == [
    "last (step 8, epoch 2)",
    "0.1",
    "2026-12-03T10:00:00+00:00",
    "0123456789",
  ]
  assert max(len(cell) for cell in rows[0]) < 40


@pytest.mark.parametrize(
  "natural,adversarial,beta_atk,expected",
  [
    (50.0, 25.0, 2.0, None),
    (50.0, 50.0, 0.0, None),
    (18.75, 25.0, 2.0, "joint loss at beta_atk=2"),
    (18.75, 25.0, 0.0, "gradient masking"),
  ],
)
def test_an_attack_that_raises_accuracy_is_explained(
  natural, adversarial, beta_atk, expected
):
  note = class_analysis.accuracy_note(
    {"natural": natural, "adversarial": adversarial}, beta_atk
  )
  if expected is None:
    assert note is None
  else:
    assert expected in note
