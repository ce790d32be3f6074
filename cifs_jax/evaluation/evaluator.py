"""Robust accuracy of a model under every run of an evaluation protocol.

``evaluate`` takes the model as ``logits_fns``, one ``logits_fn(x) ->
(final_logits, [probe_logits])`` per CIFS gradient mode ("stop", "full"), and
an iterable of eval batches; it returns the results dict (``summary.py``).

A run is (attack, beta_atk, probe, gradient mode). Each (attack, gradient
mode) is one jitted program, compiled on the first batch and reused for all
other batches and targets (eval batches share one shape; the last one is
padded, with a validity mask). Per example and run it keeps the rank of the
true class under every head (``metrics.true_class_ranks``); all tables come
from those ranks.

Runs are the outer loop: the batches are read once (and kept on the
devices), then each run goes over all of them. With a ``PartialResults``,
each finished run's ranks are written to disk at once, and a later call with
the same file skips the runs found there, so an interrupted evaluation (e.g.
Ctrl-C) loses at most the run in progress.

Batches are ``data.Batch``es (uint8 images (B, H, W, C), int labels (B,), a
(B,) bool mask that is False on padding), e.g. from ``data.eval_batches``.
They are sharded over the devices of all processes along the batch (each
process's rows padded to a multiple of its device count); the model's
variables are replicated. With several processes each passes its own rows of
every global batch, process 0's first (as ``data.eval_batches`` gives them);
the ranks are gathered from all processes, so every process returns the
same results and counts each example once.

Cascade (``protocol.cascade``; AutoAttack's protocols): the runs go in
protocol order through ``attacks.autoattack.run_cascade``, the ensemble of
``attacks.autoattack``: each run attacks only the examples whose final head
no earlier run fooled, re-batched on the host into ``chunk_sizes`` chunks.
The per-example worst case of the final head (so ``stages`` and the top-1
of ``worst_case``) is the full protocol's; an example a run did not attack
keeps its clean ranks in that run, so the per-run and per-beta tables and
the other heads count only what each run attacked. ``results["cascade"]``
gives per run and per attack the points attacked and the seconds. In one
process, AutoAttack's APGD and FAB-T run there through the ensemble's
host-driven loops (``ComponentAttack.host_loop``), outside ``jax.jit``.

Randomness does not depend on the batching: an example's random starts come
from a key folded with the run's name and the example's index in the stream
of valid examples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
import typing
import zlib
from typing import Any, Iterable, Mapping, Sequence

from absl import logging

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from cifs_jax import data
from cifs_jax import attacks
from cifs_jax.attacks import LogitsFn
from cifs_jax.attacks.autoattack import chunk_sizes, run_cascade
from cifs_jax.attacks.objectives import as_pytree
from cifs_jax.evaluation import metrics
from cifs_jax.evaluation import summary
from cifs_jax.evaluation.protocols import Attack, Protocol
from cifs_jax.evaluation.protocols import adaptive_targets, beta_label
from cifs_jax.parallel import Parallel, is_chief

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Run:
  """One attack at one (beta_atk, probe) target with one gradient mode."""

  attack: Attack
  beta: float
  probe: int | None
  gradient: str

  @property
  def name(self) -> str:
    target = beta_label(self.beta, self.probe)
    return f"{self.attack.name}/{target}/{self.gradient}"


def protocol_runs(protocol: Protocol, num_probes: int) -> list[Run]:
  """Every run of ``protocol`` on a model with ``num_probes`` probes.

  An attack that is not ``adaptive`` runs on the final head only, one that
  is not ``gradient_based`` with the first gradient mode only.
  """
  targets = adaptive_targets(protocol.betas, num_probes)
  return [
    Run(attack, beta, probe, gradient)
    for attack in protocol.attacks
    for beta, probe in (targets if attack.adaptive else [(0.0, None)])
    for gradient in (
      protocol.gradient_modes
      if attack.gradient_based
      else protocol.gradient_modes[:1]
    )
  ]


@jax.jit
def _clean_ranks(logits_fn, images, y):
  """(N, 1 + num_probes) true-class ranks on the clean inputs."""
  return _true_class_ranks(logits_fn, data.to_float(images), y)


def _true_class_ranks(logits_fn, x, y):
  """(N, 1 + num_probes) true-class ranks on inputs x (N, ...)."""
  return metrics.true_class_ranks(*logits_fn(x), y)


@functools.partial(jax.jit, static_argnames=("attack",))
def _adversarial_ranks(
  logits_fn, images, y, example_ids, run_key, head_weights, *, attack
):
  """(N, 1 + num_probes) true-class ranks on ``attack``'s inputs.

  Compiled once per (attack, logits_fn): the attacked heads' weights
  ``head_weights`` (1 + num_probes,) are an argument.
  """
  keys = _example_keys(run_key, example_ids)
  x_adv = attack(logits_fn, data.to_float(images), y, keys, head_weights)
  return _true_class_ranks(logits_fn, x_adv, y)


def _host_driven_ranks(
  host_loop, logits_fn, images, y, example_ids, run_key, head_weights
):
  """``_adversarial_ranks`` of an attack's ``host_loop`` (not traceable)."""
  x, keys = _attack_inputs(images, run_key, example_ids)
  x_adv = host_loop(logits_fn, x, y, keys, head_weights)
  return _jitted_true_class_ranks(logits_fn, x_adv, y)


_jitted_true_class_ranks = jax.jit(_true_class_ranks)


@jax.jit
def _attack_inputs(images, run_key, example_ids):
  """(float inputs in [0, 1], (N,) keys) of uint8 ``images`` (N, ...)."""
  return data.to_float(images), _example_keys(run_key, example_ids)


def _example_keys(run_key: Array, example_ids: Array) -> Array:
  """(N,) keys of the examples ``example_ids`` in a run."""
  return jax.vmap(jax.random.fold_in, (None, 0))(run_key, example_ids)


def _pad_rows(batch: data.Batch, multiple: int) -> data.Batch:
  """``batch`` with invalid zero rows appended up to a multiple of rows."""
  padding = -len(batch.labels) % multiple
  return data.Batch(
    *(
      np.concatenate([a, np.zeros((padding,) + a.shape[1:], a.dtype)])
      for a in map(np.asarray, batch)
    )
  )


def _run_key(key: Array, run: Run) -> Array:
  """A key of its own for each run, stable under changes to the run list."""
  return jax.random.fold_in(key, zlib.crc32(run.name.encode()))


class RunStore(typing.Protocol):
  """Where ``evaluate`` books finished runs and finds them again:
  ``PartialResults`` (a JSON file), or a wrapper of one such as the
  checklist's, which also keeps the ranks for its checks."""

  def start(self, fingerprint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Sets the evaluation's fingerprint; returns the ranks of its runs
    already done (run name -> (N, 1 + P) int ranks)."""

  def seconds(self, name: str) -> float | None:
    """The wall time booked with run ``name`` (None if none was)."""

  def save_run(
    self, name: str, ranks: np.ndarray, seconds: float | None = None
  ) -> None:
    """Books a finished run's (N, 1 + P) ranks and wall time."""


class PartialResults:
  """The ranks of finished runs in a JSON file, for an evaluation to resume.

  The file holds ``{"fingerprint": ..., "runs": {run name: (N, 1 + P) ranks
  as lists}, "seconds": {run name: its wall time}}`` (a cascade's runs
  keep their time; files written before that have no "seconds"). The
  fingerprint identifies the evaluation (the caller's description, e.g. the
  checkpoint, plus the protocol, the key and the labels and clean ranks of
  the examples); runs saved under another fingerprint are not reused.
  """

  def __init__(self, path: str | os.PathLike, description: Mapping[str, Any]):
    """``path``: the JSON file; ``description``: JSON-serialisable dict
    identifying the model and data evaluated (part of the fingerprint)."""
    self.path = os.fspath(path)
    self.description = dict(description)
    self._fingerprint = None
    self._runs: dict[str, list] = {}
    self._seconds: dict[str, float] = {}

  def start(self, fingerprint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Sets the evaluation's fingerprint; returns the saved runs' ranks if
    the file has the same fingerprint (else {})."""
    self._fingerprint = json.loads(
      json.dumps({**self.description, **fingerprint})
    )
    self._runs, self._seconds = {}, {}
    if not os.path.exists(self.path):
      return {}
    try:
      with open(self.path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning("Ignoring unreadable %s: %s", self.path, e)
      return {}
    if saved.get("fingerprint") != self._fingerprint:
      logging.warning(
        "Ignoring %s: it was written by a different evaluation.", self.path
      )
      return {}
    self._runs = dict(saved["runs"])
    self._seconds = dict(saved.get("seconds", {}))
    logging.info(
      "Continuing the evaluation in %s: %d runs done.",
      self.path,
      len(self._runs),
    )
    return {name: np.asarray(r, np.int32) for name, r in self._runs.items()}

  def seconds(self, name: str) -> float | None:
    """The wall time saved with run ``name`` (None if none was)."""
    return self._seconds.get(name)

  def save_run(
    self, name: str, ranks: np.ndarray, seconds: float | None = None
  ) -> None:
    """Adds a finished run (and its wall time, if given) and rewrites the
    file (atomically; process 0 of a multi-process evaluation only)."""
    self._runs[name] = np.asarray(ranks).tolist()
    if seconds is not None:
      self._seconds[name] = seconds
    if not is_chief():
      return
    directory = os.path.dirname(self.path) or "."
    handle, tmp = tempfile.mkstemp(
      prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=directory
    )
    try:
      with os.fdopen(handle, "w") as f:
        json.dump(
          {
            "fingerprint": self._fingerprint,
            "runs": self._runs,
            "seconds": self._seconds,
          },
          f,
        )
      os.replace(tmp, self.path)
    except BaseException:
      os.unlink(tmp)
      raise

  def remove(self) -> None:
    """Deletes the file (once the full results are written)."""
    if os.path.exists(self.path):
      os.remove(self.path)


def _digest(*arrays: np.ndarray) -> str:
  """sha256 of the arrays' bytes, shapes and dtypes."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def evaluate(
  logits_fns: Mapping[str, LogitsFn],
  batches: Iterable[data.Batch],
  protocol: Protocol,
  key: Array,
  *,
  class_names: Sequence[str] | None = None,
  devices: Sequence[jax.Device] | None = None,
  progress: bool = True,
  partial: RunStore | None = None,
) -> dict:
  """Evaluates a model under ``protocol``; returns the results dict.

  Args:
    logits_fns: gradient mode ("stop", "full") -> logits_fn; must cover
      ``protocol.gradient_modes`` (for a model without an input-dependent mask
      use a protocol with ``gradient_modes=("stop",)``). Pass a
      ``jax.tree_util.Partial`` over the variables (e.g. ``Partial(apply,
      variables)``) so the variables are arguments of the compiled programs
      rather than constants baked into them.
    batches: eval ``data.Batch``es (see the module docstring).
    protocol: attacks, betas and gradient modes to run.
    key: PRNG key of the random starts.
    class_names: one name per class for the per-class tables.
    devices: devices to shard the batch over (default: all devices of all
      processes).
    progress: show a tqdm progress bar over batches.
    partial: where finished runs are saved and found again (see the module
      docstring); None: nothing is saved.

  Returns:
    The results dict of ``summary.summarize``.
  """
  missing = set(protocol.gradient_modes) - set(logits_fns)
  if missing:
    raise ValueError(
      f"Protocol {protocol.name!r} attacks with gradient modes "
      f"{protocol.gradient_modes}; logits_fns lacks "
      f"{sorted(missing)}."
    )
  parallel = Parallel.create("shard_map", devices or jax.devices())
  fns = {
    mode: parallel.replicate(as_pytree(logits_fns[mode]))
    for mode in protocol.gradient_modes
  }
  clean_fn = fns[protocol.gradient_modes[0]]
  device_batches, labels, clean_ranks = [], [], []
  num_seen = 0
  for batch in batches:
    batch = _pad_rows(batch, parallel.num_local_devices)
    example_ids, num_seen = _example_ids(batch.mask.astype(bool), num_seen)
    sharded = parallel.shard(
      (batch.images, batch.labels, example_ids, batch.mask.astype(bool))
    )
    device_batches.append(sharded)
    images, y, _, mask = sharded
    batch_labels, batch_clean = _valid_rows(
      (y, _clean_ranks(clean_fn, images, y)), mask
    )
    labels.append(batch_labels)
    clean_ranks.append(batch_clean)
  if not device_batches:
    raise ValueError("No eval batches.")
  labels, clean_ranks = np.concatenate(labels), np.concatenate(clean_ranks)
  num_probes = clean_ranks.shape[1] - 1
  runs = protocol_runs(protocol, num_probes)
  num_classes = jax.eval_shape(
    clean_fn, jax.ShapeDtypeStruct(device_batches[0][0].shape, jnp.float32)
  )[0].shape[-1]
  run_ranks = {}
  if partial is not None:
    done = partial.start(
      {
        "protocol": protocol.settings(),
        "key": _digest(np.asarray(jax.random.key_data(key))),
        "examples": _digest(labels, clean_ranks),
      }
    )
    run_ranks = {run.name: done[run.name] for run in runs if run.name in done}

  def save(run, ranks, seconds=None):
    run_ranks[run.name] = ranks
    if partial is not None:
      partial.save_run(run.name, ranks, seconds)

  if protocol.cascade:
    valid = [
      _valid_rows((images, example_ids), mask)
      for images, _, example_ids, mask in device_batches
    ]
    images = np.concatenate([v[0] for v in valid])
    order = np.argsort(np.concatenate([v[1] for v in valid]))
    cascade = _cascade(
      runs,
      run_ranks,
      {name: partial.seconds(name) for name in run_ranks}
      if partial is not None
      else {},
      save,
      fns,
      parallel,
      (images[order], labels, clean_ranks),
      device_batches[0][0].shape[0],
      key,
      num_probes,
    )
  else:
    _full(
      runs,
      run_ranks,
      save,
      fns,
      device_batches,
      key,
      num_probes,
      progress and f"{protocol.name}: {len(runs)} attack runs",
    )
  results = summary.summarize(
    protocol,
    runs,
    labels=labels,
    clean_ranks=clean_ranks,
    run_ranks=run_ranks,
    num_classes=num_classes,
    class_names=class_names,
  )
  if protocol.cascade:
    results["cascade"] = cascade
  return results


def _full(
  runs, run_ranks, save, fns, device_batches, key, num_probes, progress
):
  """Every run not yet in ``run_ranks`` on every example; ``save(run,
  ranks (N, 1 + P))`` books each. ``progress``: the progress bar's
  description (it counts batches of every run), or False for none."""
  bar = tqdm.tqdm(
    total=len(runs) * len(device_batches),
    initial=len(run_ranks) * len(device_batches),
    disable=not progress,
    desc=progress or None,
    unit="batch",
  )
  for run in runs:
    if run.name in run_ranks:
      continue
    ranks = []
    for images, y, example_ids, mask in device_batches:
      batch_ranks = _adversarial_ranks(
        fns[run.gradient],
        images,
        y,
        example_ids,
        _run_key(key, run),
        attacks.head_weights(run.beta, run.probe, num_probes),
        attack=run.attack,
      )
      ranks.append(_valid_rows(batch_ranks, mask))
      bar.update(1)
    save(run, np.concatenate(ranks))
  bar.close()


def _cascade(
  runs,
  run_ranks,
  resumed_seconds,
  save,
  fns,
  parallel,
  examples,
  batch_size,
  key,
  num_probes,
):
  """The runs as a cascade (module docstring), each on the examples still
  robust; ``save(run, ranks, seconds)`` books each run not yet in
  ``run_ranks``.

  Args:
    resumed_seconds: {run name: seconds or None} of the runs in
      ``run_ranks`` (read back, not run now): their stats keep the time they
      took (None: unknown).
    examples: (uint8 images (N, H, W, C), labels (N,), clean ranks (N, 1 +
      P)), host arrays of every valid example, row = example id.
    batch_size: the largest global batch attacked at once.

  Returns:
    {"runs": {run name: stats}, "stages": {attack name: stats}}: robust
    accuracy (%) after it, points attacked, seconds (None where a resumed
    run's time is unknown); an attack's "point_runs" sums the points
    attacked over its runs.
  """
  images, labels, clean_ranks = examples
  # Each run's time: its attack's, or what was saved with a resumed run.
  seconds = dict(resumed_seconds)

  def stage(run):
    def attack(indices):
      if run.name not in run_ranks:
        start = time.perf_counter()
        ranks = clean_ranks.copy()
        ranks[indices] = _attack_examples(
          run,
          fns[run.gradient],
          parallel,
          images,
          labels,
          indices,
          batch_size,
          _run_key(key, run),
          attacks.head_weights(run.beta, run.probe, num_probes),
        )
        seconds[run.name] = time.perf_counter() - start
        save(run, ranks, seconds[run.name])
      return run_ranks[run.name][indices, 0] > 0

    return run.name, attack

  stats = [
    dataclasses.replace(stat, seconds=seconds[stat.name])
    for stat in run_cascade(
      [stage(run) for run in runs], clean_ranks[:, 0] == 0, logging.info
    )
  ]
  per_attack = {}
  for run, stat in zip(runs, stats):
    entry = per_attack.setdefault(
      run.attack.name,
      {"attacked": stat.attacked, "point_runs": 0, "seconds": 0.0},
    )
    entry["point_runs"] += stat.attacked
    if entry["seconds"] is not None and stat.seconds is not None:
      entry["seconds"] += stat.seconds
    else:
      entry["seconds"] = None
    entry["robust_accuracy"] = stat.robust_accuracy
  return {
    "runs": {s.name: dataclasses.asdict(s) for s in stats},
    "stages": per_attack,
  }


def _attack_examples(
  run,
  logits_fn,
  parallel,
  images,
  labels,
  indices,
  batch_size,
  run_key,
  head_weights,
):
  """(len(indices), 1 + P) ranks of ``run`` on the examples ``indices``.

  Chunks of ``chunk_sizes`` (each a multiple of the device count), each
  split evenly over the processes (process 0's rows first), padded with
  invalid rows. In one process, an attack with a ``host_loop`` (AutoAttack's
  APGD and FAB-T) runs it, about 3x faster on XLA:CPU than its compiled
  loops (its loop conditions read the chunk, which needs every row here).
  """
  host_loop = None
  if jax.process_count() == 1:
    host_loop = getattr(run.attack, "host_loop", None)
  num_devices = jax.device_count()
  ranks, begin = [], 0
  for size in chunk_sizes(len(indices), batch_size):
    size = -(-size // num_devices) * num_devices
    chunk = indices[begin : begin + size]
    begin += size
    padded = np.concatenate([chunk, np.full(size - len(chunk), chunk[0])])
    mask = np.arange(size) < len(chunk)
    rows = slice(
      jax.process_index() * size // jax.process_count(),
      (jax.process_index() + 1) * size // jax.process_count(),
    )
    sharded = parallel.shard(
      (
        images[padded][rows],
        labels[padded][rows],
        padded.astype(np.int32)[rows],
        mask[rows],
      )
    )
    chunk_images, y, example_ids, valid = sharded
    arguments = (logits_fn, chunk_images, y, example_ids, run_key, head_weights)
    if host_loop is None:
      chunk_ranks = _adversarial_ranks(*arguments, attack=run.attack)
    else:
      chunk_ranks = _host_driven_ranks(host_loop, *arguments)
    ranks.append(_valid_rows(chunk_ranks, valid))
  return np.concatenate(ranks) if ranks else np.zeros((0,) + (1,), np.int32)


def _example_ids(mask: np.ndarray, num_seen: int) -> tuple[np.ndarray, int]:
  """Indices in the stream of valid examples of this process's rows.

  Args:
    mask: bool (B_host,), this process's rows of a global batch.
    num_seen: valid examples in the global batches before this one.

  Returns:
    (int32 (B_host,) ids, meaningful where ``mask`` is True; ``num_seen``
    after this batch). The valid rows of lower process indices come first.
  """
  counts = multihost_utils.process_allgather(np.int32(mask.sum()))
  first = num_seen + int(counts[: jax.process_index()].sum())
  ids = (first + np.cumsum(mask) - 1).astype(np.int32)
  return ids, num_seen + int(counts.sum())


def _valid_rows(tree, mask: Array):
  """Host numpy copies of the valid rows of every process.

  Args:
    tree: pytree of global arrays (B, ...) sharded along axis 0 like
      ``mask``.
    mask: bool (B,) global array, True on valid rows.

  Returns:
    ``tree`` with leaves (num_valid, ...), rows in the global batch order.
  """
  _wait_interruptibly((tree, mask))
  tree, mask = multihost_utils.process_allgather((tree, mask), tiled=True)
  return jax.tree.map(lambda x: x[mask], tree)


def _wait_interruptibly(tree, poll_seconds: float = 0.05) -> None:
  """Waits for the arrays of ``tree`` in short sleeps rather than one
  blocking call, so that Ctrl-C (KeyboardInterrupt) acts within
  ``poll_seconds`` instead of after the attack's batch finishes."""
  for leaf in jax.tree.leaves(tree):
    while not leaf.is_ready():
      time.sleep(poll_seconds)
