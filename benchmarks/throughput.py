"""Throughput figures of one JAX workload per defence: shared by
``train_step`` and ``evaluate``."""

from __future__ import annotations

import argparse

from benchmarks import harness, jax_workloads

DEFENSES = ("none", "cifs")


def parser(description: str, batch_sizes) -> argparse.ArgumentParser:
  """Flags shared by ``train_step`` and ``evaluate``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument(
    "--defense", nargs="+", default=list(DEFENSES), choices=DEFENSES
  )
  parser.add_argument("--bf16", action="store_true", help="half_precision")
  parser.add_argument(
    "--method", default="pgd_at", choices=["pgd_at", "natural"]
  )
  parser.add_argument("--attack-steps", type=int, default=10)
  harness.common_arguments(parser, batch_sizes=batch_sizes, repeats=5)
  return parser


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
  """Parses ``argv``; ``--smoke`` also shortens the attack to 2 steps."""
  args = parser.parse_args(argv)
  harness.apply_smoke(args)
  if args.smoke:
    args.attack_steps = 2
  return args


def config_of(args: argparse.Namespace, defense: str):
  """The experiment config the flags ask for, with ``defense``."""
  return jax_workloads.experiment(
    defense, args.width, args.method, args.attack_steps, args.bf16
  )


def measure(build, defenses, bf16: bool, images: int, repeats: int) -> list:
  """Runs ``build(defense)`` -> ``Workload`` for each defence, alternating.

  ``images``: images processed per ``run()``. Returns one dict per defence
  (ms per run, images/s, compile s, FLOPs, achieved FLOP/s and fraction of
  the device's peak, peak memory) and, with both defences, the CIFS/vanilla
  time ratio in every entry.
  """
  workloads = {defense: build(defense) for defense in defenses}
  timings = harness.alternate(
    {d: w.run for d, w in workloads.items()}, repeats=repeats
  )
  rows = []
  for defense, workload in workloads.items():
    seconds = timings[defense]["median_s"]
    flops_per_s = workload.flops and workload.flops / seconds
    rows.append(
      {
        "defense": defense,
        "ms_per_run": harness.significant(1000 * seconds),
        "images_per_s": harness.significant(images / seconds),
        "compile_s": round(workload.compile_s, 2),
        "flops_per_run": workload.flops,
        "achieved_flops_per_s": flops_per_s,
        "fraction_of_peak": harness.peak_fraction(
          flops_per_s, "bfloat16" if bf16 else "float32"
        ),
        "first_run_s": timings[defense]["first_s"],
        "times_s": timings[defense]["times_s"],
      }
    )
  if {"cifs", "none"} <= set(timings):
    ratio = timings["cifs"]["median_s"] / timings["none"]["median_s"]
    for row in rows:
      row["cifs_over_vanilla"] = harness.significant(ratio)
  rows.append({"peak_memory_bytes": harness.peak_memory_bytes()})
  return rows


def summary(name: str, batch_size: int, rows: list) -> str:
  """One line: images/s and compile time per defence."""
  parts = [
    f"{r['defense']} {r['images_per_s']:.4g} img/s "
    f"({r['ms_per_run']:.4g} ms, compile {r['compile_s']:.3g} s)"
    for r in rows
    if "defense" in r
  ]
  return f"{name} b{batch_size}: " + ", ".join(parts)
