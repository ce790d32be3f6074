"""Where the time of one training step goes, in JAX and in PyTorch.

JAX: a ``jax.profiler`` trace of the compiled training step (the project's
own program, ``jax_workloads.train_step``). Every event of the trace that
names an instruction of the compiled HLO is one executed op (on CPU, one
XLA thunk); each is put in a category by its opcode and its ``op_name``
(the JAX name stack: module path, ``transpose(jvp(...))`` for gradients,
the step's ``attack`` scope):

  convolution forward / input gradient / weight gradient (the "convolution
  floor": the time of the step's convolutions alone, as they ran), layout
  (transposes and copies XLA inserts), batch norm, CIFS probe and mask,
  random keys (per-example key derivation), other (elementwise ops, losses,
  the SGD update, collectives).

PyTorch: ``torch.profiler`` over the reference step (``torch_workloads``),
its ops' self time split into convolutions (``aten::*convolution*``) and
the rest, so that the JAX/PyTorch ratio splits into the kernels' ratio and
the rest's.

  python -m benchmarks.profile_step                  # CIFS, batch 32 and 128
  python -m benchmarks.profile_step --trace-dir DIR  # keep the JAX trace
  python -m benchmarks.profile_step --smoke

writes benchmarks/results/profile_step.json (``--output``). Op times are
summed per step; "between ops" is the step's wall time (untraced, median)
less that sum: dispatch and waiting. On several threads XLA may run
independent ops at once, which makes it smaller, even negative.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import torch

from benchmarks import harness, jax_workloads, torch_workloads
from cifs_jax import losses

# Ops that only contain others: their trace events enclose their body's.
CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})
# "%name = type opcode(...)": a tuple type may hold spaces.
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r"\[([\d,]*)\]")


def parse_hlo(text: str) -> dict[str, dict]:
  """Instructions of an HLO module's text by name: {"opcode", "op_name",
  "shape" (tuple of ints, the first array of the result), "calls" (the
  computation a fusion calls), "computation" (where it is)}, plus the
  computations' opcodes under the key "__computations__"."""
  instructions, computations = {}, collections.defaultdict(set)
  computation = None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      header = _COMPUTATION.match(line)
      if header:
        computation = header.group(1)
      continue
    name, result_type, opcode, rest = match.groups()
    shape = _SHAPE.search(result_type)
    calls = _CALLS.search(rest)
    op_name = _OP_NAME.search(rest)
    instructions[name] = {
      "opcode": opcode,
      "op_name": op_name.group(1) if op_name else "",
      "shape": tuple(int(d) for d in shape.group(1).split(",") if d)
      if shape
      else (),
      "calls": calls.group(1) if calls else None,
      "computation": computation,
    }
    computations[computation].add(opcode)
  instructions["__computations__"] = computations
  return instructions


def _is_convolution(instruction: dict, computations) -> bool:
  return instruction["opcode"] == "convolution" or (
    instruction["calls"] is not None
    and "convolution" in computations.get(instruction["calls"], ())
  )


def category(instruction: dict, computations, kernel_shapes) -> str:
  """The category of one executed op (see the module docstring)."""
  op_name, opcode = instruction["op_name"], instruction["opcode"]
  scopes = op_name.split("/")
  if _is_convolution(instruction, computations):
    # XLA's rewritten weight-gradient convolutions carry no op_name; their
    # output is a kernel (activations are (B, H, W, C), never kernel-shaped).
    if tuple(sorted(instruction["shape"])) in kernel_shapes:
      return "convolution weight gradient"
    if "transpose(" in op_name:
      return "convolution input gradient"
    return "convolution forward"
  if opcode in ("copy", "transpose") or re.match(
    r"(transpose|copy)", instruction["name"]
  ):
    return "layout (transpose, copy)"
  if any(re.fullmatch(r"(shortcut_)?bn\d*", scope) for scope in scopes):
    return "batch norm"
  if any(scope.startswith("cifs") for scope in scopes):
    return "CIFS probe and mask"
  if "_example_keys" in op_name or "threefry" in op_name:
    return "random keys"
  return "other"


def phase(instruction: dict) -> str:
  """ "attack" (crafting the training inputs) or "update" (the rest)."""
  return "attack" if "/attack/" in instruction["op_name"] else "update"


def _trace_events(trace_dir: str) -> list[dict]:
  """The complete events of the newest Perfetto trace under ``trace_dir``."""
  (path,) = sorted(
    glob.glob(
      os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True
    )
  )[-1:]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def jax_profile(workload, steps: int, kernel_shapes, trace_dir: str) -> dict:
  """Seconds per step by category and by phase, from a trace of ``steps``
  runs of ``workload``, and the slowest ops."""
  instructions = parse_hlo(workload.compiled.as_text())
  computations = instructions.pop("__computations__")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      workload.run()
  by_category, by_phase = collections.Counter(), collections.Counter()
  by_op = collections.Counter()
  for event in _trace_events(trace_dir):
    instruction = instructions.get(event["name"])
    if instruction is None or instruction["opcode"] in CONTAINER_OPCODES:
      continue
    seconds = event["dur"] * 1e-6 / steps
    instruction = {**instruction, "name": event["name"]}
    kind = category(instruction, computations, kernel_shapes)
    by_category[kind] += seconds
    by_phase[f"{phase(instruction)}: {kind}"] += seconds
    by_op[f"{event['name']} ({kind})"] += seconds
  return {
    "seconds_per_step_by_category": _rounded(by_category),
    "seconds_per_step_by_phase": _rounded(by_phase),
    "slowest_ops_seconds_per_step": _rounded(dict(by_op.most_common(15))),
  }


def torch_profile(run, steps: int) -> dict:
  """Seconds per step of PyTorch's convolution ops and of the rest (ops'
  self time, so nested ops are not counted twice)."""
  activities = [torch.profiler.ProfilerActivity.CPU]
  if torch.cuda.is_available():
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as profiler:
    for _ in range(steps):
      run()
  totals = collections.Counter()
  for average in profiler.key_averages():
    kind = "convolution" if "convolution" in average.key else "other"
    device_time = getattr(average, "self_device_time_total", 0)
    totals[kind] += (device_time or average.self_cpu_time_total) * 1e-6 / steps
  return _rounded(totals)


def _rounded(seconds: dict) -> dict:
  return {
    k: harness.significant(v)
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])
  }


def measure(defense: str, batch_size: int, args, trace_dir: str) -> dict:
  """Wall time (alternating, untraced), then both profiles, of one case."""
  config = jax_workloads.experiment(
    defense, args.width, "pgd_at", args.attack_steps, bf16=False
  )
  jax_run = jax_workloads.train_step(config, batch_size)
  torch_run = torch_workloads.train_step(
    defense,
    args.width,
    batch_size,
    args.attack_steps,
    losses.DEFAULT_BETA,
    losses.REFERENCE_SCALE,
  )
  timings = harness.alternate(
    {"jax": jax_run.run, "torch": torch_run}, repeats=args.repeats
  )
  kernels = jax_workloads.kernel_shapes(config)
  jax_seconds = timings["jax"]["median_s"]
  profile = jax_profile(jax_run, args.repeats, kernels, trace_dir)
  floor = sum(
    s
    for k, s in profile["seconds_per_step_by_category"].items()
    if k.startswith("convolution")
  )
  profile["seconds_per_step_between_ops"] = harness.significant(
    jax_seconds - sum(profile["seconds_per_step_by_category"].values())
  )
  torch_seconds = timings["torch"]["median_s"]
  torch_ops = torch_profile(torch_run, args.repeats)
  return {
    "defense": defense,
    "batch_size": batch_size,
    "jax_step_s": jax_seconds,
    "torch_step_s": torch_seconds,
    "ratio_jax_over_torch": harness.significant(jax_seconds / torch_seconds),
    "jax_convolution_floor_s": harness.significant(floor),
    "jax_step_over_convolution_floor": harness.significant(jax_seconds / floor),
    "torch_convolution_s": torch_ops.get("convolution"),
    "convolution_ratio_jax_over_torch": harness.significant(
      floor / torch_ops["convolution"]
    )
    if torch_ops.get("convolution")
    else None,
    "jax": profile,
    "torch_seconds_per_step": torch_ops,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--defense", nargs="+", default=["cifs"], choices=["none", "cifs"]
  )
  parser.add_argument("--attack-steps", type=int, default=10)
  parser.add_argument(
    "--trace-dir", default=None, help="keep the JAX traces here"
  )
  harness.common_arguments(parser, batch_sizes=(32, 128), repeats=3)
  args = parser.parse_args(argv)
  harness.apply_smoke(args)
  if args.smoke:
    args.attack_steps = 2
  with tempfile.TemporaryDirectory() as scratch:
    rows = []
    for defense in args.defense:
      for batch_size in args.batch_size:
        trace_dir = os.path.join(
          args.trace_dir or scratch, f"{defense}_b{batch_size}_{time.time_ns()}"
        )
        rows.append(measure(defense, batch_size, args, trace_dir))
  results = {
    "benchmark": "profile of the training step, JAX and PyTorch",
    "environment": harness.environment(
      torch=torch.__version__, torch_threads=torch.get_num_threads()
    ),
    "config": {k: v for k, v in vars(args).items() if k != "output"},
    "results": rows,
  }
  path = harness.write_results(results, args.output, "profile_step.json")
  summary = ", ".join(
    f"{r['defense']}/b{r['batch_size']}: step {r['jax_step_s']:.3g} s = "
    f"x{r['jax_step_over_convolution_floor']:.2f} its convolutions; "
    f"JAX/PyTorch x{r['ratio_jax_over_torch']:.2f} "
    f"(convolutions x{r['convolution_ratio_jax_over_torch']})"
    for r in rows
  )
  print(
    f"profile on {results['environment']['device_kind']}: {summary}; {path}"
  )
  return results


if __name__ == "__main__":
  main()
