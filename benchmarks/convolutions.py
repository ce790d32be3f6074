"""The convolution kernels alone: ResNet-18's 3x3 convolutions, JAX vs PyTorch.

For each stage's convolution (64 channels at 32x32, 128 at 16x16, 256 at
8x8, 512 at 4x4, and the 64->128 stride-2 one) and each of its three
computations (forward, input gradient, weight gradient), JAX's compiled
program and PyTorch's op alternate in one process; the medians and their
ratio are reported, per row and summed. It separates the kernels' speed
from everything else a training step does (``profile_step``).

JAX's CPU convolutions run on Eigen because ``import cifs_jax`` sets
``cifs_jax.xla_flags.CONVOLUTIONS_OFF_YNNPACK``; run it again with
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution``
to time XLA's YNNPACK convolutions instead.

  python -m benchmarks.convolutions                  # batch 32 and 128
  python -m benchmarks.convolutions --smoke

writes benchmarks/results/convolutions.json (``--output``).
"""

from __future__ import annotations

import argparse
import os

import jax
from jax import lax
import numpy as np
import torch

from benchmarks import harness, torch_workloads
import cifs_jax  # noqa: F401  (sets the CPU convolution flag)

# (spatial size, input channels, output channels, stride) of ResNet-18's
# 3x3 convolutions on 32x32 inputs at width 64.
STAGES = ((32, 64, 64, 1), (16, 128, 128, 1), (8, 256, 256, 1))
STAGES += ((4, 512, 512, 1), (32, 64, 128, 2))
COMPUTATIONS = ("forward", "input gradient", "weight gradient")


def _jax_runs(x, w, dy, stride):
  """No-argument runs of JAX's three computations (compiled, blocking)."""

  def conv(x, w):
    return lax.conv_general_dilated(
      x,
      w,
      (stride, stride),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  programs = {
    "forward": jax.jit(conv),
    "input gradient": jax.jit(
      lambda x, w, dy: jax.vjp(lambda v: conv(v, w), x)[1](dy)[0]
    ),
    "weight gradient": jax.jit(
      lambda x, w, dy: jax.vjp(lambda v: conv(x, v), w)[1](dy)[0]
    ),
  }
  arguments = {"forward": (x, w)}

  def runner(name):
    program, args = programs[name], arguments.get(name, (x, w, dy))
    return lambda: jax.block_until_ready(program(*args))

  return {name: runner(name) for name in COMPUTATIONS}


def _torch_runs(x, w, dy, stride):
  """The same three computations in PyTorch (NCHW)."""
  device = torch_workloads.device()
  x = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(device)
  w = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous().to(device)
  dy = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous()
  dy = dy.to(device)
  grad = torch.nn.grad

  def forward():
    with torch.no_grad():
      torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
    torch_workloads.synchronize()

  def input_gradient():
    grad.conv2d_input(x.shape, w, dy, stride=stride, padding=1)
    torch_workloads.synchronize()

  def weight_gradient():
    grad.conv2d_weight(x, w.shape, dy, stride=stride, padding=1)
    torch_workloads.synchronize()

  return dict(zip(COMPUTATIONS, (forward, input_gradient, weight_gradient)))


def measure(batch_size: int, stage, repeats: int) -> list[dict]:
  """One row per computation of one stage's convolution."""
  size, channels_in, channels_out, stride = stage
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch_size, size, size, channels_in))
  w = 0.05 * jax.random.normal(keys[1], (3, 3, channels_in, channels_out))
  out = -(-size // stride)
  dy = jax.random.normal(keys[2], (batch_size, out, out, channels_out))
  jax_runs = _jax_runs(x, w, dy, stride)
  torch_runs = _torch_runs(x, w, dy, stride)
  rows = []
  for name in COMPUTATIONS:
    timings = harness.alternate(
      {"jax": jax_runs[name], "torch": torch_runs[name]}, repeats=repeats
    )
    rows.append(
      {
        "batch_size": batch_size,
        "stage": f"{channels_in}->{channels_out} at {size}x{size}"
        + (f" stride {stride}" if stride > 1 else ""),
        "computation": name,
        "jax_s": timings["jax"]["median_s"],
        "torch_s": timings["torch"]["median_s"],
        "ratio_jax_over_torch": harness.significant(
          timings["jax"]["median_s"] / timings["torch"]["median_s"]
        ),
      }
    )
  return rows


def totals(rows: list[dict]) -> dict:
  """Per batch size and computation: summed seconds and their ratio."""
  sums = {}
  for row in rows:
    key = f"b{row['batch_size']} {row['computation']}"
    jax_s, torch_s = sums.get(key, (0.0, 0.0))
    sums[key] = (jax_s + row["jax_s"], torch_s + row["torch_s"])
  return {
    key: {
      "jax_s": harness.significant(jax_s),
      "torch_s": harness.significant(torch_s),
      "ratio_jax_over_torch": harness.significant(jax_s / torch_s),
    }
    for key, (jax_s, torch_s) in sums.items()
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--smoke", action="store_true", help="seconds: batch 2, 1 repeat"
  )
  parser.add_argument("--output", default=None, help="JSON path")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch_size, args.repeats = [2], 1
  rows = [
    row
    for batch_size in args.batch_size
    for stage in STAGES
    for row in measure(batch_size, stage, args.repeats)
  ]
  results = {
    "benchmark": "ResNet-18 3x3 convolutions, JAX vs PyTorch",
    "environment": harness.environment(
      torch=torch.__version__,
      torch_threads=torch.get_num_threads(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
    ),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "totals": totals(rows),
    "results": rows,
  }
  path = harness.write_results(results, args.output, "convolutions.json")
  summary = ", ".join(
    f"{key} x{t['ratio_jax_over_torch']:.3g}"
    for key, t in results["totals"].items()
  )
  print(f"convolutions, JAX / PyTorch: {summary}; {path}")
  return results


if __name__ == "__main__":
  main()
