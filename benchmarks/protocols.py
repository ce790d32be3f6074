"""Evaluation protocols' throughput beside the training step's, and the
cascade's speed-up, on a trained run.

Each protocol of ``--protocols`` (default: paper, strong) evaluates the last
checkpoint of ``--workdir`` on its first ``--num_examples`` test images as
``python -m cifs_jax.evaluate`` does (``runs.evaluation``), twice: in full
and as a cascade (``--cascade``: each attack run only on the examples still
robust, strongest first). Per evaluation: wall seconds (compiling
included, as a user pays them), input-gradient passes (per run, the
examples it attacked times its steps times its restarts), passes per
second, and the final head's worst-case accuracy (the same in both modes).
``--attacks strong:pgd20`` (the default) runs only PGD-20 of the strong
protocol (its PGD-100 x 5 restarts at 18 targets costs hours on a CPU).
Beside them, the run's training step (its config, batch and attack)
compiled and timed on random images: images per second times (attack
steps + 1) passes per image. The protocols' AutoAttack components and the
checklist are not counted here (``benchmarks.autoattack``).

  python -m cifs_jax.main --config=configs/fmnist_resnet10_cpu.py:cifs \\
      --workdir=runs/fmnist_cifs
  python -m benchmarks.protocols --workdir=runs/fmnist_cifs --num_examples=200

writes benchmarks/results/protocols.json (``--output``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax

from benchmarks import harness, jax_workloads
from cifs_jax import data
from cifs_jax.evaluation import evaluator
from cifs_jax.runs import evaluation as runner
from cifs_jax.runs.directory import RunDirectory

TRAIN_STEPS_TIMED = 5


def gradient_passes(protocol, num_probes: int, attacked) -> int:
  """Input-gradient passes of ``protocol``: for each run, ``attacked(run)``
  examples times the run's steps times its restarts."""
  return sum(
    attacked(run) * run.attack.config.num_steps * run.attack.config.num_restarts
    for run in evaluator.protocol_runs(protocol, num_probes)
  )


def evaluate(
  config, model, variables, test, protocol_name, attack_names, cascade, args
):
  """One evaluation: its figures (module docstring)."""
  num_probes = len(
    jax.eval_shape(lambda: model.apply(variables, test.images[:1] / 255.0))[1]
  )
  protocol = runner.build_protocol(
    protocol_name,
    config.attack.eps,
    num_probes,
    model.defense.kind == "cifs",
    attack_names,
    cascade=cascade,
  )
  with tempfile.TemporaryDirectory() as output:
    start = time.perf_counter()
    results = runner.evaluate_and_publish(
      config,
      model,
      variables,
      test,
      output,
      protocol_name=protocol_name,
      num_examples=args.num_examples,
      attack_names=attack_names,
      batch_size=args.batch_size,
      cascade=cascade,
    )
    seconds = time.perf_counter() - start
  if cascade:
    runs = results["cascade"]["runs"]
    passes = gradient_passes(
      protocol, num_probes, lambda run: runs[run.name]["attacked"]
    )
  else:
    passes = gradient_passes(
      protocol, num_probes, lambda run: args.num_examples
    )
  return {
    "seconds": harness.significant(seconds),
    "gradient_passes": passes,
    "passes_per_s": harness.significant(passes / seconds),
    "worst_case_pct": results["worst_case"]["top1"],
  }


def training_passes_per_second(config, image_shape) -> dict:
  """The run's training step on random images: images and passes per s."""
  workload = jax_workloads.train_step(
    config, config.train.batch_size, image_shape
  )
  workload.run()
  start = time.perf_counter()
  for _ in range(TRAIN_STEPS_TIMED):
    workload.run()
  images_per_s = (
    TRAIN_STEPS_TIMED * config.train.batch_size / (time.perf_counter() - start)
  )
  passes_per_image = config.attack.num_steps + 1
  return {
    "compile_s": harness.significant(workload.compile_s),
    "images_per_s": harness.significant(images_per_s),
    "passes_per_image": passes_per_image,
    "passes_per_s": harness.significant(images_per_s * passes_per_image),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run")
  parser.add_argument("--protocols", nargs="+", default=["paper", "strong"])
  parser.add_argument(
    "--attacks",
    nargs="*",
    default=["strong:pgd20"],
    help="PROTOCOL:ATTACK,ATTACK...: run only these attacks of a protocol",
  )
  parser.add_argument("--num_examples", type=int, default=500)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  run = RunDirectory(args.workdir)
  config = run.load_config()
  model, variables, label = runner.restore_checkpoint(config, run, "last")
  test = data.load_split(config.data, "test").head(args.num_examples)
  args.num_examples = len(test)
  results = {
    "benchmark": "evaluation protocols vs the training step",
    "environment": harness.environment(),
    "config": vars(args),
    "checkpoint": label,
    "training": training_passes_per_second(config, test.images.shape[1:]),
    "protocols": {},
  }
  subsets = dict(entry.split(":", 1) for entry in args.attacks)
  for name in args.protocols:
    attack_names = tuple(filter(None, subsets.get(name, "").split(",")))
    full, cascade = (
      evaluate(config, model, variables, test, name, attack_names, mode, args)
      for mode in (False, True)
    )
    results["protocols"][name] = {
      "attacks": attack_names or "all",
      "full": full,
      "cascade": cascade,
      "speed_up": harness.significant(full["seconds"] / cascade["seconds"]),
    }
  path = harness.write_results(results, args.output, "protocols.json")
  print(
    f"training {results['training']['passes_per_s']:.0f} passes/s; "
    + "; ".join(
      f"{name}: full {r['full']['seconds']:.0f} s "
      f"({r['full']['passes_per_s']:.0f} passes/s), cascade "
      f"{r['cascade']['seconds']:.0f} s (x{r['speed_up']:.2f}), worst case "
      f"{r['full']['worst_case_pct']:.2f} / "
      f"{r['cascade']['worst_case_pct']:.2f} %"
      for name, r in results["protocols"].items()
    )
    + f"; {path}"
  )
  return results


if __name__ == "__main__":
  main()
