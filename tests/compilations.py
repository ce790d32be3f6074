"""Counting XLA compilations through JAX's public monitoring events."""

import contextlib

import jax

# Recorded by JAX once per XLA compilation (jax._src.dispatch), also when
# the persistent compilation cache supplies the program.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counted_compilations():
  """Yields a list that gets, per XLA compilation in the block, the name of
  the function compiled (e.g. a jitted function's ``__name__``)."""
  compilations = []

  def listener(event, duration, **kwargs):
    del duration
    if event == BACKEND_COMPILE_EVENT:
      compilations.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compilations
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
