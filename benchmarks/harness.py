"""Shared by the benchmarks: environment, timing, XLA cost analysis, JSON.

Timings are wall-clock seconds of work that has finished on the device
(``block_until_ready``); compile time is measured apart, by lowering and
compiling ahead of time. FLOPs are XLA's cost analysis of the program with
its attack loop unrolled (the model's and the attack's arithmetic as XLA
counts it).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# Dense peak FLOP/s per device kind (``jax.Device.device_kind``) and dtype,
# from the vendors' data sheets (SXM parts; "float32" is TF32 tensor cores,
# which XLA uses for float32 matmuls and convolutions by default on GPU).
PEAK_FLOPS = {
  "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 495e12},
  "NVIDIA H200": {"bfloat16": 989e12, "float32": 495e12},
  "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
  "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
}


def significant(x: float, digits: int = 4) -> float:
  """``x`` to ``digits`` significant digits (timings span 1e-5 to 1e3 s)."""
  return float(f"{x:.{digits}g}")


def load_average() -> list[float]:
  """1, 5 and 15 minute load averages of the machine."""
  return [round(x, 2) for x in os.getloadavg()]


def environment(**extra: Any) -> dict[str, Any]:
  """Device, versions and machine of this run (plus ``extra`` entries)."""
  device = jax.local_devices()[0]
  return {
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "num_devices": jax.local_device_count(),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "load_average_before": load_average(),
    **extra,
  }


def compile_ahead(jitted: Callable, *args) -> tuple[Callable, float]:
  """(compiled program, seconds to trace, lower and compile it)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def flops(program) -> float | None:
  """FLOPs of one call of a lowered or compiled program (XLA's cost
  analysis; a rolled loop's body counts once, whatever its trip count)."""
  analysis = program.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one per device
    analysis = analysis[0] if analysis else None
  return None if not analysis else analysis.get("flops")


def peak_memory_bytes() -> int:
  """Peak memory so far: the device's on GPU/TPU, this process's RSS on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_fraction(flops_per_s: float | None, dtype: str) -> float | None:
  """Achieved fraction of this device's dense peak (None if not tabled)."""
  peak = PEAK_FLOPS.get(jax.local_devices()[0].device_kind, {}).get(dtype)
  return None if peak is None or not flops_per_s else flops_per_s / peak


def alternate(
  workloads: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
  """Runs each workload in turn, ``warmup`` + ``repeats`` rounds.

  Each workload must block until its work is done. Returns per workload
  {"first_s": the first call, "median_s": median of the timed rounds,
  "times_s": the timed rounds}; alternating spreads a shared machine's
  load over all workloads alike.
  """
  times = {name: [] for name in workloads}
  for _ in range(warmup + repeats):
    for name, run in workloads.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {
    name: {
      "first_s": significant(t[0]),
      "median_s": significant(statistics.median(t[warmup:])),
      "times_s": [significant(x) for x in t[warmup:]],
    }
    for name, t in times.items()
  }


def write_results(
  results: dict[str, Any], output: str | None, default_name: str
) -> str:
  """Adds the final load average, writes JSON; returns the path."""
  results["environment"]["load_average_after"] = load_average()
  path = output or os.path.join(RESULTS_DIR, default_name)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  return path


def model_arguments(parser, smoke_help: str) -> None:
  """Flags of every model benchmark: width, smoke, output."""
  parser.add_argument(
    "--width", type=int, default=64, help="ResNet-18 first-stage channels"
  )
  parser.add_argument("--smoke", action="store_true", help=smoke_help)
  parser.add_argument("--output", default=None, help="JSON path")


def common_arguments(parser, batch_sizes: Sequence[int], repeats: int) -> None:
  """Flags of the step benchmarks: batch sizes, repeats, width, smoke,
  output."""
  parser.add_argument(
    "--batch-size", type=int, nargs="+", default=list(batch_sizes)
  )
  parser.add_argument("--repeats", type=int, default=repeats)
  model_arguments(parser, "seconds: width 4, batch 8, 1 repeat, 2 attack steps")


def apply_smoke(args) -> None:
  """The ``--smoke`` setting: a tiny model, one timed step."""
  if args.smoke:
    args.width, args.batch_size, args.repeats = 4, [8], 1
