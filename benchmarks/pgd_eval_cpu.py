"""PGD-20 evaluation time per 1,000 CIFAR-sized images with a ResNet-18.

Runs ``cifs_jax.evaluation.evaluate`` exactly as an evaluation does, with one
run: the paper protocol's PGD-20 (eps 8/255, step eps / 10, no random start)
on the joint loss at beta_atk = 2, over random 32x32x3 uint8 images and a
randomly initialised CIFAR ResNet-18 (timing does not depend on the weights).
The first batch (compilation included) is timed apart from the steady state;
the steady state gives wall-clock seconds per 1,000 images, and the CPU
seconds of this process (all threads), which a machine shared with other jobs
disturbs less. For scale, the paper reports
PGD-20 over the 10,000 CIFAR-10 test images in 53 s (vanilla) and 56 s (CIFS)
on its GPU (Section 4.1.1).

  python benchmarks/pgd_eval_cpu.py --defense cifs none --batch-size 64 \
      --num-batches 2 --unroll 1 5

writes benchmarks/results/pgd_eval_cpu.json (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from cifs_jax import data
from cifs_jax import evaluation
from cifs_jax import models

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
ATTACK_BETA = 2.0
DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "pgd_eval_cpu.json"
)


def pgd20_protocol(gradient: str, unroll: int) -> evaluation.Protocol:
  """The paper's PGD-20 alone, at beta_atk = 2, with one gradient mode."""
  paper = evaluation.paper_protocol(unroll=unroll)
  pgd20 = [a for a in paper.attacks if a.name == "pgd20"]
  return dataclasses.replace(
    paper,
    attacks=tuple(pgd20),
    betas=(ATTACK_BETA,),
    gradient_modes=(gradient,),
  )


def random_batches(num_batches: int, batch_size: int, seed: int = 0):
  """``num_batches`` full ``data.Batch``es of random uint8 images."""
  rng = np.random.default_rng(seed)
  for _ in range(num_batches):
    yield data.Batch(
      rng.integers(0, 256, (batch_size,) + IMAGE_SHAPE, np.uint8),
      rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
      np.ones(batch_size, bool),
    )


def measure(defense: str, unroll: int, args: argparse.Namespace) -> dict:
  """Times PGD-20 evaluation of a ResNet-18 with ``defense``."""
  config = models.default_config()
  config.defense = defense
  model = models.build_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), jnp.zeros((1,) + IMAGE_SHAPE)
  )
  model = models.with_relevance_grad(model, args.gradient)
  logits_fn = jax.tree_util.Partial(
    functools.partial(model.apply, train=False), variables
  )
  protocol = pgd20_protocol(args.gradient, unroll)

  def timed_evaluation(num_batches, seed):
    """(wall-clock seconds, CPU seconds of this process, all threads)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    evaluation.evaluate(
      {args.gradient: logits_fn},
      random_batches(num_batches, args.batch_size, seed),
      protocol,
      jax.random.key(1),
      progress=False,
    )
    return time.perf_counter() - start, time.process_time() - start_cpu

  first_batch_s, _ = timed_evaluation(1, seed=0)
  steady_s, steady_cpu_s = timed_evaluation(args.num_batches, seed=1)
  images = args.num_batches * args.batch_size
  return {
    "defense": defense,
    "gradient": args.gradient,
    "unroll": unroll,
    "first_batch_s": round(first_batch_s, 2),
    "steady_s": round(steady_s, 2),
    "images": images,
    "s_per_1000_images": round(1000 * steady_s / images, 1),
    "cpu_s_per_1000_images": round(1000 * steady_cpu_s / images, 1),
    "images_per_s": round(images / steady_s, 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--defense",
    nargs="+",
    default=["cifs", "none"],
    choices=["cifs", "cas", "none"],
  )
  parser.add_argument("--gradient", default="stop", choices=["stop", "full"])
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument(
    "--num-batches",
    type=int,
    default=2,
    help="timed batches after the first (compiling) one",
  )
  parser.add_argument(
    "--unroll",
    type=int,
    nargs="+",
    default=[1],
    help="PGD steps per iteration of the compiled loop",
  )
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  args = parser.parse_args()

  results = {
    "benchmark": "PGD-20 evaluation, CIFAR ResNet-18, 32x32x3 inputs",
    "attack": {
      "steps": 20,
      "eps": "8/255",
      "step_size": "0.8/255",
      "random_start": False,
      "loss": f"joint CE, beta_atk={ATTACK_BETA:g}",
      "passes_per_image": "20 forward+backward, 2 forward",
    },
    "settings": {
      "batch_size": args.batch_size,
      "num_batches": args.num_batches,
    },
    "environment": {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.local_devices()],
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "load_average_before": [round(x, 2) for x in os.getloadavg()],
    },
    "results": [
      measure(defense, unroll, args)
      for defense in args.defense
      for unroll in args.unroll
    ],
  }
  results["environment"]["load_average_after"] = [
    round(x, 2) for x in os.getloadavg()
  ]
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
