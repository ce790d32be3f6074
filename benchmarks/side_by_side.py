"""The same work in PyTorch and in JAX, in one process, alternating.

Cases (each for the vanilla and the CIFS ResNet-18):
  pgd10_at    one PGD-10 adversarial-training step (attack + SGD step)
  natural     one training step without an attack
  pgd20_eval  PGD-20 evaluation of ``--eval-images`` images (paper protocol:
              step eps / 10, no random start, joint loss at beta_atk = 2)
JAX runs the project's compiled programs at the default config
(``jax_workloads``), PyTorch the reference model with a plain PGD loop
(``torch_workloads``), both on the default device (GPU where present).
After a warm-up round (JAX's compile time is measured apart), the two
alternate ``--repeats`` times; the medians and their ratio JAX / PyTorch are
reported (below 1: JAX is faster).

  python -m benchmarks.side_by_side            # all cases: 25 min, 2 cores
  python -m benchmarks.side_by_side --case pgd10_at --batch-size 32
  python -m benchmarks.side_by_side --smoke    # tiny model: seconds

writes benchmarks/results/side_by_side.json (``--output``).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import harness, jax_workloads, torch_workloads
from cifs_jax import losses

CASES = ("pgd10_at", "natural", "pgd20_eval")
DEFENSES = ("none", "cifs")


def workloads(case, defense, batch_size, args):
  """(JAX ``Workload``, PyTorch no-argument run) of one case."""
  method = "natural" if case == "natural" else "pgd_at"
  config = jax_workloads.experiment(
    defense, args.width, method, args.attack_steps, bf16=False
  )
  if case == "pgd20_eval":
    return (
      jax_workloads.pgd20_eval(config, batch_size, args.eval_images),
      torch_workloads.pgd20_eval(
        defense,
        args.width,
        batch_size,
        args.eval_images,
        jax_workloads.ATTACK_BETA,
      ),
    )
  return (
    jax_workloads.train_step(config, batch_size),
    torch_workloads.train_step(
      defense,
      args.width,
      batch_size,
      0 if case == "natural" else args.attack_steps,
      losses.DEFAULT_BETA,
      losses.REFERENCE_SCALE,
    ),
  )


def measure(case, defense, batch_size, args) -> dict:
  """Medians of the alternating runs and their ratio."""
  jax_run, torch_run = workloads(case, defense, batch_size, args)
  timings = harness.alternate(
    {"jax": jax_run.run, "torch": torch_run}, repeats=args.repeats
  )
  return {
    "case": case,
    "defense": defense,
    "batch_size": batch_size,
    "jax_compile_s": round(jax_run.compile_s, 2),
    "jax_flops": jax_run.flops,
    **{f"{side}_{k}": v for side, t in timings.items() for k, v in t.items()},
    "ratio_jax_over_torch": harness.significant(
      timings["jax"]["median_s"] / timings["torch"]["median_s"]
    ),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--case", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument(
    "--defense", nargs="+", default=list(DEFENSES), choices=DEFENSES
  )
  parser.add_argument("--attack-steps", type=int, default=10)
  parser.add_argument("--eval-images", type=int, default=256)
  harness.common_arguments(parser, batch_sizes=(32, 128), repeats=3)
  args = parser.parse_args(argv)
  harness.apply_smoke(args)
  if args.smoke:
    args.attack_steps, args.eval_images = 2, 8
  results = {
    "benchmark": "side by side, JAX / PyTorch",
    "environment": harness.environment(
      torch=torch.__version__,
      torch_device=str(torch_workloads.device()),
      torch_threads=torch.get_num_threads(),
    ),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "results": [
      measure(case, defense, batch_size, args)
      for case in args.case
      for defense in args.defense
      for batch_size in args.batch_size
    ],
  }
  path = harness.write_results(results, args.output, "side_by_side.json")
  summary = ", ".join(
    f"{r['case']}/{r['defense']}/b{r['batch_size']}: "
    f"{r['jax_median_s']:.3g} s vs {r['torch_median_s']:.3g} s "
    f"(x{r['ratio_jax_over_torch']:.2f})"
    for r in results["results"]
  )
  device = results["environment"]["device_kind"]
  print(f"JAX vs PyTorch on {device}: {summary}; {path}")
  return results


if __name__ == "__main__":
  main()
