"""Shared by the attacks: norms, projections, per-example keys, unrolling.

Shapes: ``x`` and iterates are (N, ...) in [0, 1]; ``eps`` is the radius of
the perturbation ball in input units; ``config`` is any attack config with
``eps`` and ``norm`` ("linf" or "l2") attributes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

NORMS = ("linf", "l2")
# Guards the L-2 normalisations against a zero gradient or perturbation.
TINY = 1e-12
# ``unroll`` value that lets ``loop_unroll`` pick per backend.
AUTO_UNROLL = 0
# On CPU, loops up to this many steps are unrolled fully, longer ones by it
# (attacks whose step compiles fast, as PGD's, may pass a larger cap).
CPU_MAX_UNROLL = 20


def loop_unroll(
  unroll: int,
  num_steps: int,
  backend: str | None = None,
  cpu_max: int = CPU_MAX_UNROLL,
) -> int:
  """Steps per iteration of an attack's compiled step loop.

  ``unroll`` >= 1 is an explicit choice and is returned as is.
  ``AUTO_UNROLL`` (0) picks per backend (``jax.default_backend()`` unless
  ``backend`` is given): on CPU, where XLA runs a loop's body about 3x
  slower than the same steps outside a loop (jax-ml/jax#12868;
  benchmarks/README.md), the whole loop up to ``cpu_max`` steps and
  ``cpu_max`` beyond (compile time grows with the unrolled length); on
  GPU/TPU 1, where a rolled loop costs nothing measurable and compiles
  fastest.
  """
  if unroll < AUTO_UNROLL:
    raise ValueError(f"unroll must be >= 0 (0: automatic), got {unroll}.")
  if unroll != AUTO_UNROLL:
    return unroll
  if (backend or jax.default_backend()) != "cpu":
    return 1
  return min(num_steps, cpu_max)


def example_keys(key: Array, num_examples: int) -> Array:
  """(N,) typed keys: ``key`` itself if already per example, else a split."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, num_examples)
  if key.shape != (num_examples,):
    raise ValueError(
      f"Expected one key or {num_examples} keys, got key of shape {key.shape}."
    )
  return key


def per_example_norm(v: Array) -> Array:
  """L-2 norm over all but the batch axis, shaped to broadcast with v."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def ascent_direction(grad: Array, norm: str) -> Array:
  """The steepest-ascent unit step of ``norm`` along ``grad``."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(per_example_norm(grad), TINY)


def project(x_adv: Array, x: Array, config: Any) -> Array:
  """Back onto the eps-ball around ``x`` and into the [0, 1] box.

  For L-inf this is the exact projection onto the intersection. For L-2 the
  ball projection comes first; the box clip then only shrinks |x_adv - x|
  coordinate-wise (x is in the box), so the result stays in the ball.
  """
  if config.norm == "linf":
    return jnp.clip(
      x_adv, jnp.maximum(x - config.eps, 0.0), jnp.minimum(x + config.eps, 1.0)
    )
  delta = x_adv - x
  delta *= jnp.minimum(
    1.0, config.eps / jnp.maximum(per_example_norm(delta), TINY)
  )
  return jnp.clip(x + delta, 0.0, 1.0)


def keep_stronger(best, candidate):
  """Per example: keep the first fooling run, else the higher loss."""
  best_x, best_fooled, best_loss = best
  x_adv, fooled, loss = candidate
  take = ~best_fooled & (fooled | (loss > best_loss))
  take_x = take.reshape(take.shape + (1,) * (x_adv.ndim - 1))
  return (
    jnp.where(take_x, x_adv, best_x),
    best_fooled | fooled,
    jnp.where(take, loss, best_loss),
  )
