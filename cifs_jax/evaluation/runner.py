"""Evaluates trained model variables under a protocol and writes the results.

Shared by ``python -m cifs_jax.evaluate`` and the end of training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections

from cifs_jax import data, models
from cifs_jax.evaluation import evaluator, protocols, report
from cifs_jax.validation import check_choice


def build_protocol(
  name: str,
  eps: float,
  num_probes: int,
  has_cifs: bool,
  attack_names: Sequence[str] = (),
  unroll: int = 1,
) -> protocols.Protocol:
  """The protocol ``name`` at radius ``eps``, restricted to ``attack_names``.

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
  return protocol


def logits_functions(model: nn.Module, variables: Any) -> dict[str, Any]:
  """{"stop": ..., "full": ...} inference-mode logits_fns of ``model``."""
  return {
    mode: jax.tree_util.Partial(
      models.with_relevance_grad(model, mode).apply, variables
    )
    for mode in protocols.GRADIENT_MODES
  }


def evaluate_and_publish(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  variables: Any,
  test_split: data.Split,
  output_dir: str,
  *,
  protocol_name: str,
  num_examples: int = -1,
  attack_names: Sequence[str] = (),
  batch_size: int | None = None,
  name: str | None = None,
) -> dict:
  """Runs the protocol on the first ``num_examples`` test examples (-1: all)
  and writes ``<name>.json`` / ``<name>.md`` (default ``eval_<protocol>``)
  to ``output_dir``; returns the results dict. Every process of a
  multi-process run calls it and gets the results; process 0 writes."""
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
  )
  batch_size = batch_size or config.eval.batch_size
  results = evaluator.evaluate(
    logits_functions(model, variables),
    data.eval_batches(test_split, batch_size),
    protocol,
    jax.random.key(config.seed),
    num_batches=math.ceil(len(test_split) / batch_size),
    class_names=data.get_info(config.data.name).class_names,
    progress=jax.process_index() == 0,
  )
  if jax.process_index() == 0:
    report.publish(results, output_dir, name or f"eval_{protocol.name}")
  return results
