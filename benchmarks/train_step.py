"""Training-step throughput of the JAX implementation (no PyTorch).

Per defence (vanilla, CIFS ResNet-18) and batch size: ms per step,
images/s, compile time, FLOPs per step (XLA cost analysis), achieved FLOP/s
and, on a GPU in ``PEAK_FLOPS``, the fraction of the device's peak; peak
memory; the CIFS/vanilla time ratio. The default config's step: PGD-10 AT
(``--method natural`` for no attack), float32 or ``--bf16``.

  python -m benchmarks.train_step                  # batch 128, PGD-10 AT
  python -m benchmarks.train_step --bf16 --batch-size 128 512
  python -m benchmarks.train_step --smoke

writes benchmarks/results/train_step.json (``--output``).
"""

from __future__ import annotations

from benchmarks import harness, jax_workloads, throughput


def main(argv=None) -> dict:
  parser = throughput.parser(__doc__.split("\n")[0], batch_sizes=(128,))
  args = throughput.parse_args(parser, argv)
  results = {
    "benchmark": "training step, JAX",
    "environment": harness.environment(),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "results": {
      batch_size: throughput.measure(
        lambda d, b=batch_size: jax_workloads.train_step(
          throughput.config_of(args, d), b
        ),
        args.defense,
        args.bf16,
        images=batch_size,
        repeats=args.repeats,
      )
      for batch_size in args.batch_size
    },
  }
  path = harness.write_results(results, args.output, "train_step.json")
  for batch_size, rows in results["results"].items():
    print(throughput.summary("train step", batch_size, rows) + f"; {path}")
  return results


if __name__ == "__main__":
  main()
