"""Where the time of one training step goes, in JAX and in PyTorch.

JAX, the project's compiled training step (``jax_workloads.train_step``):

- the convolution floor: every convolution of the compiled program (parsed
  from its HLO) run alone as its own program and timed, summed by kind
  (forward, input gradient, weight gradient) and phase (``attack``:
  crafting the training inputs; ``update``: the rest). The step's wall
  time over this floor is what the rest of the step costs.
- the other ops, from a ``jax.profiler`` trace: each trace event that names
  an HLO instruction is one executed op (on CPU one XLA thunk), put in a
  category by its opcode and ``op_name`` (the JAX name stack): layout
  (transposes and copies XLA inserts), batch norm, CIFS probe and mask,
  random keys, other (elementwise ops, losses, SGD, collectives).
  Convolutions are left out of the trace's figures: XLA:CPU runs Eigen
  convolutions asynchronously, so their events miss most of their time.

PyTorch: ``torch.profiler`` over the reference step (``torch_workloads``),
its ops' self time split into convolutions (``aten::*convolution*``) and
the rest, so that the JAX/PyTorch ratio splits into the kernels' ratio and
the rest's.

  python -m benchmarks.profile_step                  # CIFS, batch 32 and 128
  python -m benchmarks.profile_step --trace-dir DIR  # keep the JAX trace
  python -m benchmarks.profile_step --smoke

writes benchmarks/results/profile_step.json (``--output``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
from jax import lax
import torch

from benchmarks import harness, jax_workloads, torch_workloads
from cifs_jax import losses

# Ops that only contain others: their trace events enclose their body's.
CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})
CONVOLUTION_KINDS = tuple(
  f"convolution {kind}"
  for kind in ("forward", "input gradient", "weight gradient")
)
# "%name = type opcode(operands), attributes": a tuple type may hold spaces.
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_WINDOW = re.compile(r"window=\{([^}]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_GROUPS = re.compile(r"(feature|batch)_group_count=(\d+)")
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
_DTYPES["f64"] = "float64"


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, str]]:
  """(instructions of an HLO module's text by name, the instruction that
  calls each fused computation). An instruction: {"opcode", "op_name",
  "dtype" and "shape" of its (first) result array, "operands" (names),
  "attributes" (after the operands, without metadata), "calls",
  "computation" (the one it is in)}."""
  instructions, callers = {}, {}
  computation = None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      header = _COMPUTATION.match(line)
      computation = header.group(1) if header else computation
      continue
    name, result_type, opcode, rest = match.groups()
    array = _ARRAY.search(result_type)
    calls = _CALLS.search(rest)
    op_name = _OP_NAME.search(rest)
    instructions[name] = {
      "opcode": opcode,
      "op_name": op_name.group(1) if op_name else "",
      "dtype": array.group(1) if array else None,
      "shape": tuple(int(d) for d in array.group(2).split(",") if d)
      if array
      else (),
      "operands": re.findall(r"%([\w.\-]+)", rest.split(")")[0]),
      "attributes": rest.split(")", 1)[-1].split(", metadata=")[0],
      "calls": calls.group(1) if calls else None,
      "computation": computation,
    }
    if calls:
      callers[calls.group(1)] = name
  return instructions, callers


def convolutions(instructions, callers) -> dict[str, str]:
  """{convolution instruction: the executed op that runs it (itself, or
  the fusion that calls its computation)}."""
  return {
    name: callers.get(instruction["computation"], name)
    for name, instruction in instructions.items()
    if instruction["opcode"] == "convolution"
  }


def category(name: str, instruction: dict) -> str:
  """The category of one executed op that is not a convolution."""
  op_name, opcode = instruction["op_name"], instruction["opcode"]
  scopes = op_name.split("/")
  if opcode in ("copy", "transpose") or re.match(r"(transpose|copy)", name):
    return "layout (transpose, copy)"
  if any(re.fullmatch(r"(shortcut_)?bn\d*", scope) for scope in scopes):
    return "batch norm"
  if any(scope.startswith("cifs") for scope in scopes):
    return "CIFS probe and mask"
  if "_example_keys" in op_name or "threefry" in op_name:
    return "random keys"
  return "other"


def phase(op_name: str) -> str:
  """ "attack" (crafting the training inputs) or "update" (the rest)."""
  return "attack" if "/attack/" in op_name else "update"


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


def trace_profile(workload, hlo, steps: int, trace_dir: str) -> dict:
  """Seconds per step of the ops other than convolutions, by category and
  by phase, from a trace of ``steps`` runs of ``workload``; the slowest.
  ``hlo``: ``parse_hlo`` of its compiled program."""
  instructions, callers = hlo
  convolution_ops = set(convolutions(instructions, callers).values())
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      workload.run()
  by_category, by_phase, by_op = (collections.Counter() for _ in range(3))
  for event in _trace_events(trace_dir):
    name = event["name"]
    instruction = instructions.get(name)
    if (
      instruction is None
      or instruction["opcode"] in CONTAINER_OPCODES
      or name in convolution_ops
    ):
      continue
    seconds = event["dur"] * 1e-6 / steps
    kind = category(name, instruction)
    by_category[kind] += seconds
    by_phase[f"{phase(instruction['op_name'])}: {kind}"] += seconds
    by_op[f"{name} ({kind})"] += seconds
  return {
    "by_category": _rounded(by_category),
    "by_phase": _rounded(by_phase),
    "slowest": _rounded(dict(by_op.most_common(10))),
  }


def _window(attributes: str, num_spatial: int):
  """(strides, padding, lhs dilation, rhs dilation) of an HLO window."""
  match = _WINDOW.search(attributes)
  fields = dict(f.split("=") for f in match.group(1).split()) if match else {}

  def ints(key):
    if key not in fields:
      return (1,) * num_spatial
    return tuple(int(v) for v in fields[key].split("x"))

  padding = [(0, 0)] * num_spatial
  if "pad" in fields:
    padding = [tuple(map(int, p.split("_"))) for p in fields["pad"].split("x")]
  return ints("stride"), padding, ints("lhs_dilate"), ints("rhs_dilate")


def _dimension_numbers(attributes: str) -> tuple[str, str, str]:
  """HLO dim_labels (``b01f_01io->b01f``) as lax specs (``NHWC``, ...)."""
  spatial = "HWDXYZ"

  def spec(labels, names):
    return "".join(spatial[int(c)] if c.isdigit() else names[c] for c in labels)

  lhs, rhs, out = _DIM_LABELS.search(attributes).groups()
  batch_feature = {"b": "N", "f": "C"}
  return (
    spec(lhs, batch_feature),
    spec(rhs, {"i": "I", "o": "O"}),
    spec(out, batch_feature),
  )


def standalone_convolution(instruction: dict, instructions: dict):
  """(jitted convolution, its two random operands) computing what one
  HLO convolution instruction computes (kernel reversal aside, which costs
  nothing), or None when its output shape does not come out the same."""
  lhs, rhs = (instructions[o] for o in instruction["operands"][:2])
  attributes = instruction["attributes"]
  strides, padding, lhs_dilation, rhs_dilation = _window(
    attributes, len(lhs["shape"]) - 2
  )
  groups = dict(_GROUPS.findall(attributes))
  convolve = functools.partial(
    lax.conv_general_dilated,
    window_strides=strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=_dimension_numbers(attributes),
    feature_group_count=int(groups.get("feature", 1)),
    batch_group_count=int(groups.get("batch", 1)),
  )
  keys = jax.random.split(jax.random.key(0))
  operands = [
    jax.random.normal(key, o["shape"], _DTYPES[o["dtype"]])
    for key, o in zip(keys, (lhs, rhs))
  ]
  if jax.eval_shape(convolve, *operands).shape != instruction["shape"]:
    return None
  return jax.jit(convolve), operands


def convolution_kind(instruction, caller, kernel_shapes) -> str:
  """Forward, input gradient or weight gradient: XLA's rewritten
  weight-gradient convolutions carry no op_name, but their output is a
  kernel (activations are (B, H, W, C), never kernel-shaped)."""
  if tuple(sorted(instruction["shape"])) in kernel_shapes:
    return CONVOLUTION_KINDS[2]
  op_name = instruction["op_name"] or caller["op_name"]
  return CONVOLUTION_KINDS[1 if "transpose(" in op_name else 0]


def _median_seconds(program, repeats: int) -> float | None:
  """Median seconds of ``repeats`` runs of a ``standalone_convolution``
  after one warm-up run; None for None."""
  if program is None:
    return None
  run, operands = program
  jax.block_until_ready(run(*operands))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(*operands))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def convolution_floor(hlo, kernel_shapes, repeats: int) -> dict:
  """The time of the step's convolutions alone: every convolution of the
  compiled step run as its own program (identical ones timed once),
  summed by kind and by phase; "untimed" counts those whose standalone
  program did not reproduce their output shape (none expected). ``hlo``:
  ``parse_hlo`` of the compiled step.

  Each convolution instruction counts once: exact when the attack loop is
  unrolled (on CPU by default), an underestimate for a rolled loop. Each
  standalone call also pays a fixed dispatch cost that the step does not,
  so for tiny convolutions (the ``--smoke`` model) the floor overstates
  them and the step can come out below it.
  """
  instructions, callers = hlo
  counts, examples = collections.Counter(), {}
  for name, op in convolutions(instructions, callers).items():
    instruction, caller = instructions[name], instructions[op]
    operands = (instructions[o] for o in instruction["operands"][:2])
    signature = (
      tuple((o["dtype"], o["shape"]) for o in operands),
      instruction["attributes"],
    )
    examples.setdefault(signature, name)
    kind = convolution_kind(instruction, caller, kernel_shapes)
    counts[(signature, kind, phase(caller["op_name"]))] += 1
  seconds = {
    signature: _median_seconds(
      standalone_convolution(instructions[name], instructions), repeats
    )
    for signature, name in examples.items()
  }
  by_kind, by_phase, untimed = collections.Counter(), collections.Counter(), 0
  for (signature, kind, where), count in counts.items():
    if seconds[signature] is None:
      untimed += count
      continue
    by_kind[kind] += count * seconds[signature]
    by_phase[f"{where}: {kind}"] += count * seconds[signature]
  return {
    "seconds": harness.significant(sum(by_kind.values())),
    "by_kind": _rounded(by_kind),
    "by_phase": _rounded(by_phase),
    "convolutions": sum(counts.values()),
    "distinct": len(examples),
    "untimed": untimed,
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
  """Wall time (alternating, untraced), the convolution floor and both
  profiles of one case."""
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
  jax_seconds = timings["jax"]["median_s"]
  torch_seconds = timings["torch"]["median_s"]
  hlo = parse_hlo(jax_run.compiled.as_text())
  floor = convolution_floor(
    hlo, jax_workloads.kernel_shapes(config), args.repeats
  )
  torch_ops = torch_profile(torch_run, args.repeats)
  return {
    "defense": defense,
    "batch_size": batch_size,
    "jax_step_s": jax_seconds,
    "torch_step_s": torch_seconds,
    "ratio_jax_over_torch": harness.significant(jax_seconds / torch_seconds),
    "jax_convolution_floor": floor,
    "jax_step_over_convolution_floor": harness.significant(
      jax_seconds / floor["seconds"]
    ),
    "convolution_ratio_jax_over_torch": harness.significant(
      floor["seconds"] / torch_ops["convolution"]
    ),
    "jax_other_ops_traced": trace_profile(
      jax_run, hlo, args.repeats, trace_dir
    ),
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
