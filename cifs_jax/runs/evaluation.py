"""Evaluates trained model variables under a protocol and writes the results.

Shared by ``python -m cifs_jax.evaluate`` (``evaluate_checkpoint``) and the
end of training (``evaluate_and_publish``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import subprocess
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cifs_jax import data, experiment_config, models, parallel
from cifs_jax.evaluation import checklist, evaluator, protocols, report
from cifs_jax.runs.directory import (
  REPORT_PREFIX,
  RunDirectory,
  best_metric,
  evaluation_report_name,
  make_writable_directory,
  partial_results_path,
)
from cifs_jax.runs import checkpoints
from cifs_jax.validation import check_choice

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EvaluationInterrupted(KeyboardInterrupt):
  """Ctrl-C during an evaluation; the message says where its finished runs
  are kept and how to continue."""


def build_protocol(
  name: str,
  eps: float,
  num_probes: int,
  has_cifs: bool,
  attack_names: Sequence[str] = (),
  unroll: int = 0,
  cascade: bool = False,
) -> protocols.Protocol:
  """The protocol ``name`` at radius ``eps``, restricted to ``attack_names``
  (``cascade``: as ``protocols.as_cascade``).

  Models without CIFS have no input-dependent mask to differentiate through,
  so they are attacked with one gradient mode; models without probes have no
  adaptive targets but the final head.
  """
  check_choice("protocol", name, tuple(protocols.PROTOCOLS))
  protocol = protocols.PROTOCOLS[name](eps=eps, unroll=unroll)
  protocol = protocol.select(attack_names)
  if not has_cifs:
    protocol = dataclasses.replace(protocol, gradient_modes=("stop",))
  if num_probes == 0:
    protocol = dataclasses.replace(protocol, betas=(0.0,))
  return protocols.as_cascade(protocol) if cascade else protocol


def logits_functions(model: nn.Module, variables: Any) -> dict[str, Any]:
  """{"stop": ..., "full": ...} inference-mode logits_fns of ``model``."""
  return {
    mode: jax.tree_util.Partial(
      models.with_relevance_grad(model, mode).apply, variables
    )
    for mode in protocols.GRADIENT_MODES
  }


def project_commit() -> str:
  """``git rev-parse HEAD`` of the project's checkout, or "unknown"."""
  try:
    result = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      cwd=_PACKAGE_DIR,
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  commit = result.stdout.strip()
  return commit if result.returncode == 0 and commit else "unknown"


def checkpoint_label(
  config: ml_collections.ConfigDict,
  which: str | int,
  step: int,
  metadata: Mapping[str, Any],
) -> dict:
  """What a report says about the checkpoint it evaluated.

  Args:
    config: the run's config.
    which: how it was chosen: "best", "last", a step, or "final state" (the
      end of training).
    step: its global step.
    metadata: its saved metadata (epoch, "metrics" of the per-epoch
      evaluation).

  Returns:
    {which, step, epoch, metrics, best_metric, per_epoch_eval_examples}:
    "best" is the checkpoint with the highest ``best_metric`` on the first
    ``per_epoch_eval_examples`` test examples, measured every epoch.
  """
  metrics = dict(metadata.get("metrics", {}))
  return {
    "which": which,
    "step": step,
    "epoch": metadata.get("epoch"),
    "metrics": metrics,
    "best_metric": best_metric(config),
    "per_epoch_eval_examples": int(
      metrics.get("eval_examples", config.eval.num_examples)
    ),
  }


def device_description() -> str:
  """The devices of the run, over all processes: "4 x cpu (cpu) over 2
  processes", or "8 x NVIDIA H100 (gpu)" for one process."""
  device = jax.devices()[0]
  description = (
    f"{jax.device_count()} x {device.device_kind} ({device.platform})"
  )
  if jax.process_count() > 1:
    description += f" over {jax.process_count()} processes"
  return description


def run_label(
  config: ml_collections.ConfigDict,
  protocol: protocols.Protocol,
  checkpoint: Mapping[str, Any] | None,
  num_examples: int,
) -> dict:
  """What was evaluated, where and when: the ``run`` entry of a report."""
  return {
    "dataset": config.data.name,
    "model": config.model.name,
    "width": config.model.width,
    "defense": config.model.defense,
    "train_method": config.train.method,
    "eps": config.attack.eps,
    "protocol": protocol.name,
    "checkpoint": dict(checkpoint) if checkpoint else None,
    "num_examples": num_examples,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    "device": device_description(),
    "jax_version": jax.__version__,
    "git_commit": project_commit(),
  }


def evaluate_and_publish(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  variables: Any,
  test_split: data.Split,
  output_dir: str | os.PathLike,
  *,
  protocol_name: str,
  num_examples: int = -1,
  attack_names: Sequence[str] = (),
  batch_size: int | None = None,
  name: str | None = None,
  checkpoint: Mapping[str, Any] | None = None,
  cascade: bool = False,
) -> dict:
  """Runs the protocol on the first ``num_examples`` test examples (-1: all)
  and writes ``<name>.json`` / ``<name>.md`` (default ``eval_<protocol>``)
  to ``output_dir``; returns the results dict. Every process of a
  multi-process run calls it and gets the results; process 0 writes.

  ``output_dir`` is checked to be writable before any attack runs. Each
  finished run is saved to ``<name>.partial.json`` there, and a rerun after
  an interruption continues from it (``evaluator.PartialResults``); the file
  is removed once the report is written. ``checkpoint`` (``checkpoint_label``)
  goes into the report's ``run`` entry. ``cascade``: only the per-example
  worst case (``protocols.as_cascade``).
  """
  output_dir = make_writable_directory(output_dir)
  test_split = test_split.head(num_examples)
  num_probes = len(
    jax.eval_shape(
      lambda: model.apply(variables, test_split.images[:1] / 255.0)
    )[1]
  )
  protocol = build_protocol(
    protocol_name,
    config.attack.eps,
    num_probes,
    model.defense.kind == "cifs",
    attack_names,
    config.attack.unroll,
    cascade,
  )
  name = name or f"{REPORT_PREFIX}{protocol.name}"
  label = run_label(config, protocol, checkpoint, len(test_split))
  partial = partial_results(output_dir, name, label, config.seed)
  batch_size = batch_size or config.eval.batch_size
  with keeping_finished_runs(partial):
    results = evaluator.evaluate(
      logits_functions(model, variables),
      data.eval_batches(test_split, batch_size),
      protocol,
      jax.random.key(config.seed),
      class_names=data.get_info(config.data.name).class_names,
      partial=partial,
      progress=parallel.is_chief(),
    )
  results["run"] = label
  if parallel.is_chief():
    report.publish(results, output_dir, name)
    print(report.console_summary(results))
    partial.remove()
  return results


def partial_results(
  output_dir: str | os.PathLike,
  name: str,
  label: Mapping[str, Any],
  seed: int,
  **description: Any,
) -> evaluator.PartialResults:
  """``<name>.partial.json`` in ``output_dir``: the finished attack runs of
  the evaluation of the model and checkpoint in ``label`` (``run_label``),
  with PRNG ``seed`` and the JSON-serialisable ``description`` (e.g. a
  surrogate's label); runs of another evaluation are not reused."""
  return evaluator.PartialResults(
    partial_results_path(output_dir, name),
    {
      key: label[key]
      for key in ("dataset", "model", "width", "defense", "checkpoint")
    }
    | {"seed": seed}
    | description,
  )


@contextlib.contextmanager
def keeping_finished_runs(partial: evaluator.PartialResults):
  """Turns Ctrl-C into ``EvaluationInterrupted``, whose message says that
  the finished runs are kept in ``partial``'s file."""
  try:
    yield
  except KeyboardInterrupt:
    raise EvaluationInterrupted(
      f"Interrupted. The finished attack runs are kept in {partial.path};"
      " run the same command again to continue from them."
    ) from None


def restore_checkpoint(
  config: ml_collections.ConfigDict, run: RunDirectory, which: str | int
) -> tuple[nn.Module, Any, dict]:
  """(model, variables, ``checkpoint_label``) of checkpoint ``which`` of a
  run, read without writing anything to the run directory."""
  model = models.build_model(config.model)
  image_shape = data.get_info(config.data.name).image_shape
  with run.checkpointer(config, read_only=True) as checkpointer:
    state, metadata = checkpointer.restore(
      which, model_variables_target(model, image_shape), partial=True
    )
  label = checkpoint_label(config, which, int(state["step"]), metadata)
  return model, {k: state[k] for k in ("params", "batch_stats")}, label


def model_variables_target(model: nn.Module, image_shape) -> dict:
  """The fields of a saved ``TrainState`` that evaluating a checkpoint
  reads, as shapes: {"step", "params", "batch_stats"}; the optimiser state
  is left on disk."""
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, *image_shape))
  )
  return {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "params": variables["params"],
    "batch_stats": variables.get("batch_stats", {}),
  }


def evaluate_checkpoint(
  workdir: str | os.PathLike,
  *,
  config: ml_collections.ConfigDict | None = None,
  checkpoint: str = "last",
  protocol: str = "paper",
  attacks: Sequence[str] = (),
  num_examples: int = -1,
  batch_size: int | None = None,
  output: str | os.PathLike | None = None,
  cascade: bool = False,
) -> dict:
  """``python -m cifs_jax.evaluate``: evaluates checkpoint ``checkpoint`` of
  the run in ``workdir`` and writes ``eval_<protocol>_<checkpoint>.json`` /
  ``.md`` to ``output`` (default: ``workdir``); returns the results dict.

  Args:
    workdir: the training run's directory (only read).
    config: the run's config (default: its config.json).
    checkpoint: "last", "best" or a step number (digits).
    protocol: a key of ``protocols.PROTOCOLS``.
    attacks: a subset of the protocol's attacks (default: all).
    num_examples: the first N test examples (-1: all).
    batch_size: global eval batch (default: ``eval.batch_size``).
    output: where the reports go.
    cascade: only the per-example worst case, each attack run on the
      examples still robust (``protocols.as_cascade``); the report is
      ``eval_<protocol>_cascade_<checkpoint>``.

  Raises:
    ValueError: ``checkpoint`` is not "best", "last" or a step.
    FileNotFoundError: no run directory, config.json or such checkpoint.
    OSError: ``output`` is not writable (before any attack runs).
  """
  run = RunDirectory(workdir)
  which = checkpoints.parse_which(checkpoint)
  config = config or run.load_config()
  experiment_config.validate(config)
  model, variables, label = restore_checkpoint(config, run, which)
  return evaluate_and_publish(
    config,
    model,
    variables,
    data.load_split(config.data, "test"),
    output or workdir,
    protocol_name=protocol,
    num_examples=num_examples,
    attack_names=attacks,
    batch_size=batch_size,
    name=evaluation_report_name(protocol, checkpoint, cascade),
    checkpoint=label,
    cascade=cascade,
  )


def checklist_checkpoint(
  workdir: str | os.PathLike,
  *,
  config: ml_collections.ConfigDict | None = None,
  checkpoint: str = "last",
  num_examples: int = -1,
  batch_size: int | None = None,
  output: str | os.PathLike | None = None,
  surrogate: str | os.PathLike | None = None,
  surrogate_checkpoint: str = "last",
  settings: checklist.Settings | None = None,
) -> list[checklist.CheckResult]:
  """``python -m cifs_jax.evaluate --protocol=checklist``: runs the
  checklist on checkpoint ``checkpoint`` of the run in ``workdir`` and
  writes ``eval_checklist_<checkpoint>.json`` / ``.md`` to ``output``
  (default: ``workdir``); returns the checks.

  Args:
    workdir, config, checkpoint, num_examples, batch_size, output: as
      ``evaluate_checkpoint``'s.
    surrogate: the workdir of a run trained the same way without the
      defence (check 12), or None.
    surrogate_checkpoint: its checkpoint ("last", "best" or a step).
    settings: the checklist's settings (default: ``checklist.Settings``
      with the config's ``attack.unroll``).

  Each finished attack run is saved to ``eval_checklist_<checkpoint>
  .partial.json`` in ``output``; a rerun after an interruption continues
  from it, and the file is removed once the report is written.
  """
  run = RunDirectory(workdir)
  which = checkpoints.parse_which(checkpoint)
  config = config or run.load_config()
  experiment_config.validate(config)
  output = make_writable_directory(output or workdir)
  model, variables, label = restore_checkpoint(config, run, which)
  logits_fns = logits_functions(model, variables)
  if model.defense.kind != "cifs":
    logits_fns = {"stop": logits_fns["stop"]}
  surrogate_fn, surrogate_label = None, None
  if surrogate is not None:
    surrogate_run = RunDirectory(surrogate)
    surrogate_config = surrogate_run.load_config()
    surrogate_model, surrogate_variables, surrogate_label = restore_checkpoint(
      surrogate_config,
      surrogate_run,
      checkpoints.parse_which(surrogate_checkpoint),
    )
    surrogate_fn = logits_functions(surrogate_model, surrogate_variables)[
      "full"
    ]
    surrogate_label = {"workdir": os.fspath(surrogate), **surrogate_label}
  settings = settings or checklist.Settings(unroll=config.attack.unroll)
  split = data.load_split(config.data, "test").head(num_examples)
  protocol = protocols.Protocol(checklist.NAME, (), tuple(logits_fns))
  run_entry = run_label(config, protocol, label, len(split)) | {
    "surrogate": surrogate_label
  }
  name = evaluation_report_name(checklist.NAME, checkpoint)
  partial = partial_results(
    output, name, run_entry, config.seed, surrogate=surrogate_label
  )
  with keeping_finished_runs(partial):
    checks, results = checklist.run_checklist(
      logits_fns,
      split.images,
      split.labels,
      config.attack.eps,
      jax.random.key(config.seed),
      surrogate=surrogate_fn,
      settings=settings,
      batch_size=batch_size or config.eval.batch_size,
      progress=parallel.is_chief(),
      partial=partial,
    )
  results["run"] = run_entry
  if parallel.is_chief():
    checklist.publish(checks, results, settings, output, name)
    print(checklist.console_summary(checks))
    partial.remove()
  return checks
