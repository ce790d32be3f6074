"""The config files of configs/: variants applied last, their budgets, and
values refused before anything runs."""

import importlib
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from cifs_jax import experiment_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))


def config_module(name: str):
  return importlib.import_module(f"configs.{name}")


def flat(config: ml_collections.ConfigDict) -> dict:
  """{"section.key": value} of every leaf."""
  items = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      items.update({f"{key}.{k}": v for k, v in flat(value).items()})
    else:
      items[key] = value
  return items


def test_every_config_file_is_found():
  assert {"cifar_resnet18", "fmnist_resnet10", "fmnist_resnet10_cpu"} <= set(
    CONFIG_FILES
  )


def test_every_config_file_loads_from_outside_the_repository(tmp_path):
  """``--config=<path>`` from another working directory (the repository
  not on sys.path): a derived config file finds the one it builds on."""
  loader = (
    "import sys; from absl import flags; "
    "from ml_collections import config_flags\n"
    "for i, path in enumerate(sys.argv[1:]):\n"
    "  config = config_flags.DEFINE_config_file(f'config{i}', path)\n"
    "flags.FLAGS(['x'])\n"
  )
  paths = [str(CONFIG_DIR / f"{name}.py") for name in CONFIG_FILES]
  loaded = subprocess.run(
    [sys.executable, "-c", loader, *paths],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    check=False,
  )
  assert loaded.returncode == 0, loaded.stderr[-2000:]


@pytest.mark.parametrize("variant", sorted(experiment_config.VARIANTS))
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_variants_are_applied_after_the_files_own_settings(name, variant):
  """``file.py:variant`` keeps every value the variant sets on the file's
  own settings, whatever the file (and the files it derives from)
  overrides."""
  module = config_module(name)
  own = flat(module.settings())
  variant_set = flat(
    experiment_config.apply_variants(module.settings(), variant)
  )
  written = {k: v for k, v in variant_set.items() if own[k] != v}
  loaded = flat(module.get_config(variant))
  assert {k: loaded[k] for k in written} == written
  assert loaded == variant_set
  experiment_config.validate(module.get_config(variant))


def test_smoke_and_natural_pretrain_survive_the_cpu_config():
  """The derived CPU config used to set its own width, epochs and
  milestones after the variants, undoing them."""
  cpu = config_module("fmnist_resnet10_cpu")
  smoke = cpu.get_config("smoke")
  assert smoke.model.width == 8 and smoke.train.epochs == 1
  assert smoke.train.max_examples == 256
  pretrain = cpu.get_config("natural_pretrain")
  assert pretrain.train.epochs == 50 and pretrain.train.lr_milestones == ()
  assert pretrain.train.method == "natural"


@pytest.mark.parametrize("variant", ["", "vanilla", "cas", "cifs"])
def test_cpu_config_evaluates_as_its_docstring_says(variant):
  """About ten minutes a model: the final natural and PGD-20 check on 5,000
  images, no adaptive sweep (4 attacks x 9 beta_atk targets)."""
  config = config_module("fmnist_resnet10_cpu").get_config(variant)
  assert not config.eval.final
  assert config.eval.final_num_examples == 5_000
  assert config.eval.num_examples == 500
  assert config.model.width == 16 and config.train.epochs == 2


@pytest.mark.parametrize("variant", ["", "vanilla", "cas", "cifs"])
def test_results_config_is_the_budget_its_docstring_states(variant):
  """docs/results.md's budget: the CPU config on all 60,000 training
  images for 9 epochs, the reference milestones scaled, the final check on
  the whole test set."""
  cpu = config_module("fmnist_resnet10_cpu").get_config(variant)
  config = config_module("fmnist_resnet10_results").get_config(variant)
  assert config.train.max_examples == -1 and config.train.epochs == 9
  assert config.train.lr_milestones == (6, 7)
  assert config.eval.final_num_examples == -1 and not config.eval.final
  assert config.model == cpu.model and config.attack == cpu.attack


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_smoke_evaluation_is_tiny(name):
  """A smoke run evaluates a few dozen images, with one one-step attack in
  its final sweep."""
  config = config_module(name).get_config("smoke")
  assert config.eval.num_examples <= 64 and config.eval.pgd_steps <= 2
  assert config.eval.final_attacks == ("fgsm",)
  assert 0 < config.eval.final_num_examples <= 32
  assert config.train.epochs == 1 and config.train.max_examples <= 256


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("train.loss_beta", math.inf, "config.train.loss_beta=inf must be"),
    ("eval.beta_atk", -1.0, "config.eval.beta_atk=-1.0 must be"),
    ("model.width", 0, "model.width=0 must be >= 1"),
    ("model.width", -4, "model.width=-4 must be >= 1"),
  ],
)
def test_values_that_used_to_break_later_are_refused(key, value, message):
  config = experiment_config.base_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    experiment_config.validate(config)


@pytest.mark.parametrize("defense", ["none", "cas"])
def test_beta_atk_inf_needs_probes_and_a_finite_loss_scale(defense):
  """The per-epoch check at beta_atk = inf attacks the probes alone: vanilla
  has none (it used to fail when the check was first traced, after an
  epoch), CAS's scale 1 + beta would be inf."""
  config = experiment_config.base_config()
  config.eval.beta_atk = math.inf
  experiment_config.validate(config)  # CIFS: the probes alone, fine.
  config.model.defense = defense
  with pytest.raises(ValueError, match="eval.beta_atk=inf .* needs"):
    experiment_config.validate(config)


@pytest.mark.parametrize("name", ["resnet10", "wrn28_10"])
def test_a_set_width_is_the_width_built(name):
  """width 1 is a real (tiny) width, not the default's stand-in."""
  from cifs_jax import models

  config = models.default_config()
  config.name = name
  config.width = 1
  model = models.build_model(config)
  built = model.widen_factor if name == "wrn28_10" else model.width
  assert built == 1
  config.width = None
  default = models.build_model(config)
  assert (default.widen_factor if name == "wrn28_10" else default.width) == (
    10 if name == "wrn28_10" else 64
  )
