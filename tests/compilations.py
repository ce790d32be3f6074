"""Counting XLA compilations through JAX's public monitoring events."""

import contextlib

import jax

# Recorded by JAX once per XLA compilation (jax._src.dispatch), also when
# the persistent compilation cache supplies the program.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counted_compilations():
  """Yields a list that gets, per XLA compilation in the block, the name JAX
  gives the program: ``jit(f)`` for a jitted function ``f``."""
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
