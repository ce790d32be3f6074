"""The linen models inside Flax NNX: conversions of variables, nothing more.

Flax's own bridge is all that is needed to use a CIFS layer or a backbone of
``cifs_jax.models`` in an NNX model; ``nnx.bridge.ToNNX`` wraps it:

  model = nnx.bridge.ToNNX(models.build_model(config))
  model.lazy_init(x, rngs=jax.random.key(0))  # the variables of init(key, x)
  logits, probe_logits = model(x)             # inference mode
  logits, probe_logits = model(               # training mode, updates the
      x, train=True, labels=y, mutable=["batch_stats"])  # batch statistics

Give the initialisation key to ``lazy_init`` and not ``rngs=nnx.Rngs(...)``
to ``ToNNX``: with an ``nnx.Rngs`` the wrapper draws a key (mutates its
state) at every call, which raises ``flax.errors.TraceContextError`` inside a
JAX transform that NNX does not manage, such as the ``jax.grad`` of
``cifs_jax.attacks``. The models draw no random numbers after init.

This module converts between such a module and linen variables
({"params": ..., "batch_stats": ...}, e.g. a checkpoint of
``cifs_jax.main``): ``load_linen_variables`` checks the variables' paths and
shapes first (``nnx.update`` silently adds unknown paths to the module),
``linen_variables`` is its inverse, and ``from_linen`` wraps a module with
given variables without computing a random initialisation first.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import linen as nn
from flax import nnx, traverse_util
import jax

# (collection, *path in the collection) -> shape.
_ShapeMap = dict[tuple[str, ...], tuple[int, ...]]


def from_linen(
  module: nn.Module,
  variables: Mapping[str, Any],
  *example_args: Any,
  **example_kwargs: Any,
) -> nnx.bridge.ToNNX:
  """``module`` as an NNX module that holds ``variables``.

  The wrapper is initialised abstractly (``nnx.eval_shape``: no arrays are
  computed), then ``variables`` are loaded with ``load_linen_variables``.

  Args:
    module: a linen module, e.g. ``models.build_model(config)``.
    variables: its variables, {collection: nested dict of arrays}.
    *example_args: inputs of ``module`` that fix the variables' shapes, e.g.
      images (N, H, W, C); only their shapes and dtypes are used.
    **example_kwargs: keyword inputs of ``module``, likewise.

  Returns:
    An ``nnx.bridge.ToNNX`` whose variables are ``variables``.

  Raises:
    ValueError: ``variables`` do not fit ``module`` (see
      ``load_linen_variables``).
  """
  model = nnx.eval_shape(
    lambda: nnx.bridge.ToNNX(module).lazy_init(
      *example_args, rngs=jax.random.key(0), **example_kwargs
    )
  )
  load_linen_variables(model, variables)
  return model


def linen_variables(model: nnx.Module) -> dict[str, Any]:
  """The variables of ``model`` in linen's layout.

  Args:
    model: an NNX module, e.g. a lazily initialised ``nnx.bridge.ToNNX``.

  Returns:
    {collection: nested dict of arrays}, collections named as in linen
    ("params" for ``nnx.Param``, "batch_stats" for ``nnx.BatchStat``); the
    arrays are the module's current values (not copies).
  """
  flat = {}
  state = nnx.state(model, nnx.Not(nnx.RngState))
  for path, variable in nnx.to_flat_state(state):
    collection = nnx.variable_name_from_type(type(variable))
    flat[(collection, *path)] = variable.get_value()
  return traverse_util.unflatten_dict(flat)


def load_linen_variables(
  model: nnx.Module, variables: Mapping[str, Any]
) -> None:
  """Overwrites the variables of ``model`` with linen ``variables``, in place.

  Args:
    model: a lazily initialised ``nnx.bridge.ToNNX`` (or any NNX module).
    variables: {collection: nested dict of arrays}, e.g. the output of the
      wrapped linen module's ``init``; every variable of ``model`` exactly
      once, with its shape (arrays, or anything with a ``shape``).

  Raises:
    ValueError: a path is missing from ``variables`` or not in ``model``, or
      a shape differs; the message names them. ``model`` is then unchanged.
  """
  expected = _shapes(linen_variables(model))
  given = _shapes(variables)
  problems = [
    f"missing {_name(key)} {shape}"
    for key, shape in expected.items()
    if key not in given
  ]
  problems += [
    f"unknown {_name(key)} {shape}"
    for key, shape in given.items()
    if key not in expected
  ]
  problems += [
    f"{_name(key)}: model {expected[key]}, variables {shape}"
    for key, shape in given.items()
    if key in expected and expected[key] != shape
  ]
  if problems:
    raise ValueError(
      "The linen variables do not fit the NNX module: " + "; ".join(problems)
    )
  nnx.update(model, *variables.values())


def _shapes(variables: Mapping[str, Any]) -> _ShapeMap:
  """{(collection, *path): shape} of nested linen variables."""
  return {
    key: tuple(value.shape)
    for key, value in traverse_util.flatten_dict(variables).items()
  }


def _name(key: tuple[str, ...]) -> str:
  """A variable's key as "collection/module/.../name"."""
  return "/".join(str(part) for part in key)
