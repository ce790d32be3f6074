"""PGD-20 evaluation throughput of the JAX implementation (no PyTorch).

The paper protocol's PGD-20 (eps 8/255, step eps / 10, no random start) on
the joint loss at beta_atk = 2, with natural and adversarial top-1, over
``--images`` random CIFAR-sized images: the figures of ``train_step``
(per pass over the images) for the vanilla and CIFS ResNet-18.

  python -m benchmarks.evaluate                    # 1,024 images, batch 128
  python -m benchmarks.evaluate --bf16 --batch-size 256 --images 2048
  python -m benchmarks.evaluate --smoke

writes benchmarks/results/evaluate.json (``--output``).
"""

from __future__ import annotations

from benchmarks import harness, jax_workloads, throughput


def main(argv=None) -> dict:
  parser = throughput.parser(__doc__.split("\n")[0], batch_sizes=(128,))
  parser.add_argument("--images", type=int, default=1024)
  args = throughput.parse_args(parser, argv)
  if args.smoke:
    args.images = args.batch_size[0]
  images = args.images
  results = {
    "benchmark": "PGD-20 evaluation, JAX",
    "environment": harness.environment(),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "results": {
      batch_size: throughput.measure(
        lambda d, b=batch_size: jax_workloads.pgd20_eval(
          throughput.config_of(args, d), b, images
        ),
        args.defense,
        args.bf16,
        images=images,
        repeats=args.repeats,
      )
      for batch_size in args.batch_size
    },
  }
  path = harness.write_results(results, args.output, "evaluate.json")
  for batch_size, rows in results["results"].items():
    print(throughput.summary("PGD-20 eval", batch_size, rows) + f"; {path}")
  return results


if __name__ == "__main__":
  main()
