"""Figures 1 and 3 for a trained model: one class, natural and adversarial.

``analyze_class`` attacks the test examples of one class with an attack of
the paper protocol (PGD-20: step eps / 10, no random start) on Eq. 3's loss
at ``beta_atk`` (2, the training loss of CIFS and CAS; a vanilla model's
loss is its cross-entropy), reads the channel means of the natural and
adversarial inputs (``features.channel_means``) and summarises them
(``channels.class_channel_statistics``) against the class's weights of the
last linear layer. ``save_class_analysis`` writes the figure (PNG), the
numbers (JSON) and the raw channel means (NPZ).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from cifs_jax import attacks, data
from cifs_jax.analysis import channels, features, plots
from cifs_jax.evaluation import protocols

INPUTS = ("natural", "adversarial")
# The attacker's Eq. 3 trade-off: the training loss of CIFS and CAS.
DEFAULT_BETA_ATK = 2.0


def class_examples(split: data.Split, class_index: int, num_examples: int):
  """The first ``num_examples`` (-1: all) examples of class ``class_index``."""
  if not 0 <= class_index < split.num_classes:
    raise ValueError(
      f"class index {class_index} is not in [0, {split.num_classes})."
    )
  indices = np.flatnonzero(np.asarray(split.labels) == class_index)
  if indices.size == 0:
    raise ValueError(f"The split has no example of class {class_index}.")
  subset = data.Split(
    split.images[indices], split.labels[indices], split.num_classes
  )
  return subset.head(num_examples)


def accuracy_note(accuracy: dict[str, float], beta_atk: float) -> str | None:
  """Why the adversarial accuracy (%) is above the natural one, when it is:
  the attack maximises Eq. 3's joint loss, which at beta_atk > 0 includes
  the probes' cross-entropy, not the final head's alone; None otherwise."""
  if accuracy["adversarial"] <= accuracy["natural"]:
    return None
  if beta_atk > 0:
    return (
      f"The attack raised the final head's accuracy: it maximises Eq. 3's"
      f" joint loss at beta_atk={beta_atk:g} (the probes' cross-entropy as"
      " well), not the final head's, and can move examples towards their"
      " class there. --beta_atk=0 attacks the final head alone."
    )
  return (
    "The attack raised the final head's accuracy although it maximises the"
    " final head's loss alone: a sign of a weak attack or of gradient"
    " masking; check with python -m cifs_jax.evaluate --protocol=checklist."
  )


def paper_attack(name: str, eps: float) -> protocols.Attack:
  """The attack ``name`` (fgsm, pgd20, cw, pgd100) of the paper protocol."""
  return protocols.paper_protocol(eps=eps).select([name]).attacks[0]


@functools.partial(jax.jit, static_argnames=("model", "attack"))
def _batch_channel_means(model, attack, variables, x, y, head_weights):
  """{input: {site: (B, C)}} and {input: (B,) correct} for one batch."""
  logits_fn = jax.tree_util.Partial(model.apply, variables)
  keys = jax.random.split(jax.random.key(0), x.shape[0])
  inputs = {
    "natural": x,
    "adversarial": attack(logits_fn, x, y, keys, head_weights),
  }
  means = {
    name: features.channel_means(model, variables, v)
    for name, v in inputs.items()
  }
  correct = {
    name: logits_fn(v)[0].argmax(-1) == y for name, v in inputs.items()
  }
  return means, correct


def _valid_rows(values: jax.Array, mask: np.ndarray) -> np.ndarray:
  """The rows of a padded batch that are examples: (B, ...) -> (n, ...)."""
  return np.asarray(values)[mask]


def collect_channel_means(
  model: nn.Module,
  variables: Mapping[str, Any],
  split: data.Split,
  attack: protocols.Attack,
  beta_atk: float = DEFAULT_BETA_ATK,
  batch_size: int = 256,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Channel means and correctness of the natural and attacked examples.

  Returns:
    ({input: {site: (N, C) channel means}}, {input: (N,) bool correct}),
    inputs "natural" and "adversarial", sites ``features.feature_sites``.
  """
  num_probes = len(
    jax.eval_shape(lambda: model.apply(variables, split.images[:1] / 255.0))[1]
  )
  weights = attacks.head_weights(
    beta_atk if num_probes else 0.0, None, num_probes
  )
  means, correct = [], []
  for batch in data.eval_batches(split, batch_size):
    batch_means, batch_correct = _batch_channel_means(
      model,
      attack,
      variables,
      data.to_float(batch.images),
      batch.labels,
      weights,
    )
    valid = functools.partial(_valid_rows, mask=np.asarray(batch.mask))
    means.append(jax.tree.map(valid, batch_means))
    correct.append(jax.tree.map(valid, batch_correct))
  stack = lambda *parts: np.concatenate(parts)
  return jax.tree.map(stack, *means), jax.tree.map(stack, *correct)


def analyze_class(
  model: nn.Module,
  variables: Mapping[str, Any],
  split: data.Split,
  class_index: int,
  attack: protocols.Attack,
  beta_atk: float = DEFAULT_BETA_ATK,
  batch_size: int = 256,
) -> dict[str, Any]:
  """Figures 1/3's numbers for the examples of one class in ``split``.

  Args:
    model, variables: the trained model.
    split: the examples, all of class ``class_index``
      (``class_examples``).
    class_index: the class whose weights order the channels.
    attack: the attack crafting the adversarial inputs (``paper_attack``).
    beta_atk: Eq. 3's trade-off of the attacker (a model without probes is
      attacked on its final head).
    batch_size: examples per compiled batch.

  Returns:
    {"statistics": {site: {input: ChannelStatistics}}, "channel_means":
    {input: {site: (N, C)}}, "accuracy": {input: top-1 in %},
    "num_examples": N}.
  """
  means, correct = collect_channel_means(
    model, variables, split, attack, beta_atk, batch_size
  )
  class_weights = np.asarray(features.classifier_kernel(variables))[
    :, class_index
  ]
  statistics = {
    site: {
      name: channels.class_channel_statistics(means[name][site], class_weights)
      for name in INPUTS
    }
    for site in features.feature_sites(model)
  }
  return {
    "statistics": statistics,
    "channel_means": means,
    "accuracy": {name: 100.0 * correct[name].mean() for name in INPUTS},
    "num_examples": len(split),
  }


def save_class_analysis(
  analysis: Mapping[str, Any],
  metadata: Mapping[str, Any],
  output_dir: str | os.PathLike,
  stem: str,
) -> dict[str, str]:
  """Writes ``<stem>.png``, ``<stem>.json`` and ``<stem>.npz``.

  Args:
    analysis: ``analyze_class``'s result.
    metadata: JSON values describing it (run, class, attack, ...); the
      figure's title is built from it.
    output_dir: the directory to write to (created).
    stem: the files' name without suffix.

  Returns:
    {"png" | "json" | "npz": path}.
  """
  os.makedirs(output_dir, exist_ok=True)
  path = lambda suffix: os.path.join(os.fspath(output_dir), stem + suffix)
  statistics = analysis["statistics"]
  numbers = {
    **metadata,
    "num_examples": analysis["num_examples"],
    "accuracy": analysis["accuracy"],
    "frequency_threshold": channels.FREQUENCY_THRESHOLD,
    "statistics": {
      site: {name: stats.as_dict() for name, stats in by_input.items()}
      for site, by_input in statistics.items()
    },
  }
  with open(path(".json"), "w") as f:
    json.dump(numbers, f, indent=2)
    f.write("\n")
  np.savez(
    path(".npz"),
    **{
      f"{name}/{site}": values
      for name, by_site in analysis["channel_means"].items()
      for site, values in by_site.items()
    },
  )
  accuracy = analysis["accuracy"]
  title = (
    f"{metadata.get('run', '')}: class {metadata.get('class', '')!r}, "
    f"{analysis['num_examples']} examples, natural "
    f"{accuracy['natural']:.1f} % / {metadata.get('attack', 'adversarial')} "
    f"{accuracy['adversarial']:.1f} %"
  )
  plots.plot_channel_panel(statistics, title, path(".png"))
  return {suffix: path("." + suffix) for suffix in ("png", "json", "npz")}
