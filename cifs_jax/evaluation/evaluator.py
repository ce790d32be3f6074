"""Robust accuracy of a model under every run of an evaluation protocol.

``evaluate`` takes the model as ``logits_fns``, one ``logits_fn(x) ->
(final_logits, [probe_logits])`` per CIFS gradient mode ("stop", "full"), and
an iterable of eval batches; it returns the results dict (``summary.py``).

A run is (attack, beta_atk, probe, gradient mode). Each run is one jitted
program, compiled on the first batch and reused for all others (eval batches
share one shape; the last one is padded, with a validity mask). Per example
and run it keeps the rank of the true class under every head
(``metrics.true_class_ranks``); all tables come from those ranks.

Batches are ``data.Batch``es (uint8 images (B, H, W, C), int labels (B,), a
(B,) bool mask that is False on padding), e.g. from ``data.eval_batches``.
They are sharded over the local devices along the batch (padded to a
multiple of the device count); the model's variables are replicated.

Randomness does not depend on the batching: an example's random starts come
from a key folded with the run's name and the example's index in the stream
of valid examples.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cifs_jax import data
from cifs_jax import attacks
from cifs_jax.attacks import LogitsFn
from cifs_jax.evaluation import metrics
from cifs_jax.evaluation import summary
from cifs_jax.evaluation.protocols import Attack, Protocol
from cifs_jax.evaluation.protocols import adaptive_targets, beta_label
from cifs_jax.parallel import Parallel

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
  return metrics.true_class_ranks(*logits_fn(data.to_float(images)), y)


@functools.partial(jax.jit, static_argnames=("attack",))
def _adversarial_ranks(
  logits_fn, images, y, example_ids, run_key, head_weights, *, attack
):
  """(N, 1 + num_probes) true-class ranks on ``attack``'s inputs.

  Compiled once per (attack, logits_fn): the attacked heads' weights
  ``head_weights`` (1 + num_probes,) are an argument.
  """
  keys = jax.vmap(jax.random.fold_in, (None, 0))(run_key, example_ids)
  x_adv = attack(logits_fn, data.to_float(images), y, keys, head_weights)
  return metrics.true_class_ranks(*logits_fn(x_adv), y)


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


def evaluate(
  logits_fns: Mapping[str, LogitsFn],
  batches: Iterable[data.Batch],
  protocol: Protocol,
  key: Array,
  *,
  num_batches: int | None = None,
  class_names: Sequence[str] | None = None,
  devices: Sequence[jax.Device] | None = None,
  progress: bool = True,
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
    num_batches: length of ``batches`` for the progress bar, if known.
    class_names: one name per class for the per-class tables.
    devices: devices to shard the batch over (default: all local devices).
    progress: show a tqdm progress bar over batches.

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
  parallel = Parallel.create("shard_map", devices or jax.local_devices())
  fns = {
    mode: parallel.replicate(_as_pytree(logits_fns[mode]))
    for mode in protocol.gradient_modes
  }
  clean_fn = fns[protocol.gradient_modes[0]]
  runs = None
  labels, clean_ranks = [], []
  run_ranks: dict[str, list[np.ndarray]] = {}
  num_seen = 0
  for batch in tqdm.tqdm(
    batches,
    total=num_batches,
    disable=not progress,
    desc=f"eval ({protocol.name})",
    unit="batch",
  ):
    batch = _pad_rows(batch, parallel.num_local_devices)
    mask = batch.mask.astype(bool)
    example_ids = (num_seen + np.cumsum(mask) - 1).astype(np.int32)
    num_seen += int(mask.sum())
    images, y, example_ids = parallel.shard(
      (batch.images, batch.labels, example_ids)
    )
    batch_clean = _clean_ranks(clean_fn, images, y)
    if runs is None:
      num_probes = batch_clean.shape[1] - 1
      runs = protocol_runs(protocol, num_probes)
      num_classes = jax.eval_shape(
        clean_fn, jax.ShapeDtypeStruct(images.shape, jnp.float32)
      )[0].shape[-1]
    batch_runs = {
      run.name: _adversarial_ranks(
        fns[run.gradient],
        images,
        y,
        example_ids,
        _run_key(key, run),
        attacks.head_weights(run.beta, run.probe, num_probes),
        attack=run.attack,
      )
      for run in runs
    }
    labels.append(batch.labels[mask])
    clean_ranks.append(np.asarray(batch_clean)[mask])
    for name, ranks in batch_runs.items():
      run_ranks.setdefault(name, []).append(np.asarray(ranks)[mask])
  if runs is None:
    raise ValueError("No eval batches.")
  return summary.summarize(
    protocol,
    runs,
    labels=np.concatenate(labels),
    clean_ranks=np.concatenate(clean_ranks),
    run_ranks={name: np.concatenate(r) for name, r in run_ranks.items()},
    num_classes=num_classes,
    class_names=class_names,
  )


def _as_pytree(logits_fn: LogitsFn) -> jax.tree_util.Partial:
  """``logits_fn`` as a pytree a jitted function can take as an argument."""
  if isinstance(logits_fn, jax.tree_util.Partial):
    return logits_fn
  return jax.tree_util.Partial(logits_fn)
