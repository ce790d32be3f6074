"""Standard AutoAttack wall time per 1,000 CIFAR-sized images, ResNet-18.

Each component of the standard version (APGD-CE, APGD-T, FAB-T, Square) is
timed on one batch of random 32x32x3 images with a randomly initialised CIFAR
ResNet-18 (CIFS by default) at eps = 0, where no point is ever fooled, so
every component spends its whole budget on every point: the cost of a point
that stays robust to the end, the case that dominates AutoAttack's time.
To keep the run short each component runs a reduced budget (``--fraction``
of its iterations: the same compiled step, repeated fewer times), timed
after a first, compiling call; the time per iteration is scaled to the full
budget (APGD-CE 100 steps, APGD-T 9 x 100, FAB-T 9 x 100, Square 5,000
queries). AutoAttack attacks a point with a stage only while it is robust,
so with clean accuracy c and robust accuracy r its time per 1,000 images is
about c * APGD-CE + r * (APGD-T + FAB-T + Square); the result gives the
worst case c = r = 1 and ``--clean`` / ``--robust`` (default 0.8 / 0.5).

  python -m benchmarks.autoattack --batch-size 16 --fraction 0.05
  python -m benchmarks.autoattack --smoke   # tiny model: seconds

``--official`` also times the official code's components (pyautoattack,
requirements-crosscheck.txt) the same way, on the PyTorch copy of the model
(tests/torch_reference.py, its own random weights: at eps = 0 no point is
fooled whatever the weights), with the same reduced budgets, torch on as
many threads as the machine has cores.

writes benchmarks/results/autoattack.json (``--output``).

``--against_official`` instead times the whole standard AutoAttack (full
budgets, L-inf eps 0.1) side by side with the official code (pyautoattack,
requirements-crosscheck.txt) on the same model and points: a width-8
ResNet-10 trained briefly on real Fashion-MNIST and exported to PyTorch
(tests/exported_resnet10.py), its first ``--points`` test images, the two
run alternately in this process (``--repeats`` rounds; our first run
includes compiling), torch on as many threads as the machine has cores, as
JAX's CPU backend. Per stage: seconds, points attacked, robust accuracy;
writes benchmarks/results/autoattack_vs_official.json.

  python -m benchmarks.autoattack --against_official --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from cifs_jax import attacks
from cifs_jax import models
from cifs_jax.attacks.autoattack import COMPONENTS, HOST_LOOPS, VERSIONS
from cifs_jax.attacks.autoattack import Settings, plan

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def full_iterations(config) -> int:
  """Iterations (gradient steps or queries) of a component's full budget."""
  if isinstance(config, attacks.SquareConfig):
    return config.num_queries
  targets = 1
  if isinstance(config, attacks.FABConfig) or config.targeted:
    targets = min(config.num_target_classes, NUM_CLASSES - 1)
  return targets * config.num_steps * config.num_restarts


def reduced(config, fraction: float):
  """The config with ``fraction`` of its iterations, all on one target."""
  iterations = max(int(fraction * full_iterations(config)), 1)
  if isinstance(config, attacks.SquareConfig):
    return dataclasses.replace(config, num_queries=iterations)
  return dataclasses.replace(
    config, num_steps=iterations, num_target_classes=1, num_restarts=1
  )


def time_component(attack, config, logits_fn, x, y):
  """(seconds of the first call, seconds of the second) of one batch, run as
  ``attacks.autoattack()`` runs it: its host loop (APGD, FAB-T), else
  compiled whole."""
  run = HOST_LOOPS.get(attack) or jax.jit(attack, static_argnums=(4,))
  times = []
  for seed in range(2):
    start = time.perf_counter()
    jax.block_until_ready(run(logits_fn, x, y, jax.random.key(seed), config))
    times.append(time.perf_counter() - start)
  return times


def time_official_component(adversary, name, iterations, x, y):
  """Seconds of the official ``name`` stage with ``iterations`` (steps on one
  target, or queries), after a first, warming call, as the official
  ``run_standard_evaluation`` sets each attack up."""
  if name == "square":
    attack = adversary.square
    attack.n_queries = iterations
  else:
    attack = {
      "apgd-ce": adversary.apgd,
      "apgd-t": adversary.apgd_targeted,
      "fab-t": adversary.fab,
    }[name]
    attack.n_iter, attack.n_restarts = iterations, 1
  if name == "apgd-ce":
    attack.loss = "ce"
  if name in ("apgd-t", "fab-t"):
    attack.n_target_classes = 1
    attack.targeted = True
  times = []
  for _ in range(2):
    start = time.perf_counter()
    attack.perturb(x, y)
    times.append(time.perf_counter() - start)
  return times


def measure_official(args, budgets) -> dict:
  """The official components' cost per 1,000 images, as ``measure``'s:
  ``budgets`` maps each stage to (timed iterations, full iterations)."""
  import torch  # noqa: PLC0415 (optional: requirements-test.txt)
  from pyautoattack import AutoAttack  # noqa: PLC0415 (optional package)

  from benchmarks import torch_workloads  # noqa: PLC0415 (needs torch)

  torch.set_num_threads(os.cpu_count())
  net = torch_workloads.model(args.defense, args.width).eval()

  class FinalLogits(torch.nn.Module):
    def forward(self, x):
      return net(x)[0]

  model = FinalLogits()
  x = torch.rand(
    (args.batch_size,) + IMAGE_SHAPE[2:] + IMAGE_SHAPE[:2],
    generator=torch.Generator().manual_seed(0),
  ).to(torch_workloads.device())
  with torch.no_grad():
    y = model(x).argmax(1)  # all clean-correct
  adversary = AutoAttack(
    model, eps=0.0, seed=0, version="standard", device=x.device
  )
  per_component = {}
  for name, (iterations, full) in budgets.items():
    first_s, steady_s = time_official_component(
      adversary, name, iterations, x, y
    )
    per_component[name] = {
      "first_call_s": harness.significant(first_s),
      "timed_s": harness.significant(steady_s),
      "full_s_per_1000_images": harness.significant(
        steady_s / iterations * full * 1000 / args.batch_size
      ),
    }
  return per_component


def measure(args) -> dict:
  config = models.default_config()
  config.defense = args.defense
  config.width = args.width
  model = models.with_relevance_grad(models.build_model(config), "stop")
  x = jnp.asarray(
    np.random.default_rng(0).uniform(size=(args.batch_size,) + IMAGE_SHAPE),
    jnp.float32,
  )
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), x[:1]
  )
  logits_fn = jax.tree_util.Partial(
    functools.partial(model.apply, train=False), variables
  )
  y = jnp.argmax(logits_fn(x)[0], axis=-1)  # all clean-correct
  names, settings = plan("standard", eps=0.0)
  per_component, budgets = {}, {}
  for name in names:
    attack, full = COMPONENTS[name](settings)
    config = reduced(full, args.fraction)
    budgets[name] = (full_iterations(config), full_iterations(full))
    first_s, steady_s = time_component(attack, config, logits_fn, x, y)
    per_iteration = steady_s / full_iterations(config)
    per_component[name] = {
      "timed_iterations": full_iterations(config),
      "full_iterations": full_iterations(full),
      "first_call_s": harness.significant(first_s),
      "timed_s": harness.significant(steady_s),
      "full_s_per_1000_images": harness.significant(
        per_iteration * full_iterations(full) * 1000 / args.batch_size
      ),
    }
  results = _totals(args, names, per_component)
  if args.official:
    results["official"] = _totals(args, names, measure_official(args, budgets))
  return results


def _totals(args, names, per_component) -> dict:
  """``per_component`` with standard AutoAttack's totals per 1,000 images."""
  cost = {n: c["full_s_per_1000_images"] for n, c in per_component.items()}
  later = sum(cost[n] for n in names[1:])
  return {
    "components": per_component,
    "standard_s_per_1000_images_all_robust": harness.significant(
      sum(cost.values())
    ),
    f"standard_s_per_1000_images_clean{args.clean}_robust{args.robust}": (
      harness.significant(args.clean * cost[names[0]] + args.robust * later)
    ),
  }


def against_official(args) -> dict:
  """Standard AutoAttack, official and ours alternately (module doc)."""
  import torch  # noqa: PLC0415 (optional: requirements-test.txt)

  from tests import exported_resnet10  # noqa: PLC0415 (needs torch)

  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as workdir:
    logits_fn, torch_model, x, y = exported_resnet10.train_and_export(
      workdir, width=args.width, num_points=args.points
    )
  components = {
    name: lambda s, name=name: COMPONENTS[name](
      dataclasses.replace(s, unroll=args.unroll)
    )
    for name in ("apgd-ce", "apgd-t")
  }
  rounds = []
  for seed in range(args.repeats):
    start = time.perf_counter()
    robust_after, seconds = exported_resnet10.official_autoattack(
      torch_model, x, y, args.eps, seed=seed
    )
    official_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = attacks.autoattack(
      logits_fn, x, y, jax.random.key(seed), eps=args.eps, components=components
    )
    ours_s = time.perf_counter() - start
    stages = {
      s.name: {
        "official_s": harness.significant(seconds[s.name]),
        "ours_s": harness.significant(s.seconds),
        "attacked": s.attacked,
        "official_robust_pct": harness.significant(
          100 * robust_after[s.name].mean()
        ),
        "ours_robust_pct": harness.significant(s.robust_accuracy),
      }
      for s in ours.stages
    }
    rounds.append(
      {
        "official_s": harness.significant(official_s),
        "ours_s": harness.significant(ours_s),
        "ratio": harness.significant(ours_s / official_s),
        "stages": stages,
      }
    )
    print(
      f"round {seed}: official {official_s:.1f} s, ours {ours_s:.1f} s "
      f"(ratio {ours_s / official_s:.2f}); "
      + ", ".join(
        f"{n} {v['official_s']:.1f}/{v['ours_s']:.1f} s "
        f"{v['official_robust_pct']:.2f}/{v['ours_robust_pct']:.2f} %"
        for n, v in stages.items()
      ),
      flush=True,
    )
  return {"clean_pct": ours.accuracy["clean"], "rounds": rounds}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--defense", default="cifs", choices=["cifs", "none"])
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument(
    "--fraction",
    type=float,
    default=0.05,
    help="fraction of each component's iterations to time",
  )
  parser.add_argument("--clean", type=float, default=0.8)
  parser.add_argument("--robust", type=float, default=0.5)
  harness.model_arguments(
    parser, "seconds: width 4, batch 2, one iteration of each component"
  )
  parser.add_argument(
    "--official",
    action="store_true",
    help="also time the official code's components (pyautoattack)",
  )
  parser.add_argument(
    "--against_official",
    action="store_true",
    help="standard AutoAttack side by side with the official code",
  )
  parser.add_argument("--points", type=int, default=300)
  parser.add_argument("--eps", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument(
    "--unroll",
    type=int,
    default=Settings(eps=0.0).unroll,
    help="APGD steps per loop iteration (0: per backend)",
  )
  args = parser.parse_args(argv)
  if args.against_official:
    # PyTorch 2.13's oneDNN AVX-512 convolution backward, on 2 threads,
    # corrupts the heap within a few input gradients of this model
    # ("double free or corruption"; the official FAB-T aborts); its AVX2
    # kernels run the official AutoAttack to the end, about as fast (70.5
    # vs 67.4 s, benchmarks/README.md). Read when torch's first
    # convolution runs; your own setting wins.
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    if args.width == 64:  # the ResNet-18 default: use the small model's
      args.width = 8
    results = {
      "benchmark": "standard AutoAttack (L-inf) vs the official code, "
      "Fashion-MNIST ResNet-10",
      "config": {k: v for k, v in vars(args).items() if k != "output"},
      "environment": harness.environment(),
      "results": against_official(args),
    }
    path = harness.write_results(
      results, args.output, "autoattack_vs_official.json"
    )
    print(path)
    return results
  if args.smoke:
    args.width, args.batch_size, args.fraction = 4, 2, 0.0
  results = {
    "benchmark": "standard AutoAttack (L-inf), CIFAR ResNet-18, 32x32x3",
    "components": list(VERSIONS["standard"][0]),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "environment": harness.environment(),
    "results": measure(args),
  }
  path = harness.write_results(results, args.output, "autoattack.json")
  measured = results["results"]
  per_component = ", ".join(
    f"{name} {c['full_s_per_1000_images']:.4g}"
    for name, c in measured["components"].items()
  )
  total = measured["standard_s_per_1000_images_all_robust"]
  print(
    f"standard AutoAttack, s per 1,000 images: {per_component}; "
    f"all robust {total:.4g}; {path}"
  )
  if args.official:
    official = measured["official"]
    print(
      "official: "
      + ", ".join(
        f"{name} {c['full_s_per_1000_images']:.4g}"
        for name, c in official["components"].items()
      )
      + f"; all robust {official['standard_s_per_1000_images_all_robust']:.4g}"
    )
  return results


if __name__ == "__main__":
  main()
