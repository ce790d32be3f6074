"""How the tests compile: XLA flags, and counting XLA compilations through
JAX's public monitoring events."""

import contextlib
import os

import jax

# XLA flags of the test process (conftest.py): LLVM's optimisation level 0
# halves the compile time that dominates the in-process tests on CPU (a
# TRADES step of a ResNet-10: 100 s -> 49 s) and computes the same
# functions (the tests' tolerances hold). The commands that tests run in
# subprocesses, which attack thousands of images, keep XLA's defaults: at
# level 0 their generated code runs several times slower.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def set_test_xla_flags(environ=os.environ) -> None:
  """Puts ``TEST_XLA_FLAGS`` before the flags ``environ["XLA_FLAGS"]``
  already has (which win), for a process whose XLA backend has not started
  yet."""
  environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {environ.get('XLA_FLAGS', '')}"


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
