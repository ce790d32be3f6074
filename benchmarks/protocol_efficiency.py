"""Evaluation efficiency: image-gradient passes per second of each
protocol's attack runs next to the training step's, on one model.

The model is the Fashion-MNIST CIFS ResNet-10 (28x28x1, 10 classes,
``--width``), randomly initialised: an attack's cost does not depend on the
weights when every example is attacked (the full protocols). One
image-gradient pass is a forward and backward pass of one image to its input
gradient: a PGD step, an FGSM step, a restart's step.

- Training: the PGD-10 AT step (``make_train_step``, as training compiles
  it) on a batch of ``--batch-size``: 10 attack passes and one update pass
  per image.
- Each protocol (``--protocols``): ``evaluator.evaluate`` on ``--images``
  random images at beta_atk 0 and inf (inf also with each probe alone),
  called twice: the first call compiles each (attack,
  gradient mode) program, the second reuses them. Passes = sum over the
  protocol's runs of steps x restarts x images.

  python -m benchmarks.protocol_efficiency                 # width 16
  python -m benchmarks.protocol_efficiency --smoke

writes benchmarks/results/protocol_efficiency.json (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import numpy as np

from benchmarks import harness
from cifs_jax import data, evaluation, experiment_config, models
from cifs_jax.evaluation import evaluator
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax.runs.evaluation import build_protocol, logits_functions
from cifs_jax.training import step as step_lib, train_state

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
TARGETS = (0.0, math.inf)  # the attacker betas of each timed protocol


def fmnist_config(width: int):
  """``configs/fmnist_resnet10.py``'s model and attack at ``width``."""
  config = experiment_config.base_config()
  config.data.name = "fashion_mnist"
  config.model.name = "resnet10"
  config.model.width = width
  config.attack.eps, config.attack.step_size = 0.1, 0.01
  return config


def random_split(num_images: int) -> data.Split:
  rng = np.random.default_rng(0)
  return data.Split(
    rng.integers(0, 256, (num_images, *IMAGE_SHAPE), dtype=np.uint8),
    rng.integers(0, NUM_CLASSES, num_images).astype(np.int32),
    NUM_CLASSES,
  )


def training_passes_per_s(config, batch_size: int, repeats: int) -> dict:
  """Image-gradient passes per second of the training step."""
  model = models.build_model(config.model, bn_axis_name=BATCH_AXIS)
  parallel = Parallel.create("shard_map", jax.local_devices()[:1])
  state = parallel.replicate(
    train_state.create_train_state(
      models.build_model(config.model), IMAGE_SHAPE, config, 1
    )
  )
  split = parallel.replicate(random_split(batch_size))
  indices = parallel.shard(np.arange(batch_size, dtype=np.int32))
  step = parallel.compile(
    step_lib.make_train_step(
      model, config, data.augment_options(config.data), steps_per_epoch=1
    ),
    sharded_args=(False, False, True),
    donate_first=True,
  )
  compiled, compile_s = harness.compile_ahead(step, state, split, indices)
  states = [state]

  def run():
    states[0], metrics = compiled(states[0], split, indices)
    jax.block_until_ready(metrics)

  seconds = harness.alternate({"train": run}, repeats)["train"]["median_s"]
  passes = (config.attack.num_steps + 1) * batch_size
  return {
    "batch_size": batch_size,
    "compile_s": round(compile_s, 2),
    "step_s": seconds,
    "passes_per_image": config.attack.num_steps + 1,
    "passes_per_s": harness.significant(passes / seconds),
  }


def run_passes(run) -> int:
  """Image-gradient passes per image of one evaluator run."""
  config = run.attack.config
  return config.num_steps * getattr(config, "num_restarts", 1)


def protocol_passes_per_s(name, config, split, batch_size) -> dict:
  """Both calls of ``evaluate`` under protocol ``name`` (module docstring)."""
  model = models.build_model(config.model)
  variables = model.init(jax.random.key(0), split.images[:1] / 255.0)
  num_probes = len(model.apply(variables, split.images[:1] / 255.0)[1])
  protocol = build_protocol(name, config.attack.eps, num_probes, has_cifs=True)
  protocol = dataclasses.replace(protocol, betas=TARGETS)
  runs = evaluator.protocol_runs(protocol, num_probes)
  passes = len(split) * sum(run_passes(run) for run in runs)
  # One set of logits_fns for both calls: the compiled programs are keyed
  # by them (a new ``logits_functions`` would compile again).
  logits_fns = logits_functions(model, variables)
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    evaluation.evaluate(
      logits_fns,
      data.eval_batches(split, batch_size),
      protocol,
      jax.random.key(0),
      progress=False,
    )
    seconds.append(time.perf_counter() - start)
  return {
    "runs": len(runs),
    "passes_per_image": passes // len(split),
    "first_call_s": harness.significant(seconds[0]),
    "second_call_s": harness.significant(seconds[1]),
    "passes_per_s": harness.significant(passes / seconds[1]),
    "passes_per_s_with_compile": harness.significant(passes / seconds[0]),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--protocols", nargs="+", default=["paper", "strong"])
  harness.model_arguments(
    parser, "width 4, 8 images, 1 repeat, the paper protocol only"
  )
  parser.set_defaults(width=16)
  args = parser.parse_args(argv)
  if args.smoke:
    args.width, args.images, args.batch_size, args.repeats = 4, 8, 8, 1
    args.protocols = ["paper"]
  config = fmnist_config(args.width)
  split = random_split(args.images)
  results = {
    "benchmark": "evaluation efficiency per protocol vs the training step",
    "environment": harness.environment(),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "results": {
      "training": training_passes_per_s(config, args.batch_size, args.repeats),
      **{
        name: protocol_passes_per_s(name, config, split, args.batch_size)
        for name in args.protocols
      },
    },
  }
  path = harness.write_results(results, args.output, "protocol_efficiency.json")
  training = results["results"]["training"]["passes_per_s"]
  for name, row in results["results"].items():
    print(
      f"{name}: {row['passes_per_s']:.4g} image-gradient passes/s "
      f"({row['passes_per_s'] / training:.2f}x training)"
    )
  print(path)
  return results


if __name__ == "__main__":
  main()
