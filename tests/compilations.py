"""How the tests compile: XLA flags, and counting XLA compilations through
JAX's public monitoring events."""

import contextlib
import os

import jax

# XLA flags of the test process (conftest.py): LLVM's optimisation level 1
# compiles about as fast as level 0 and runs about as fast as the default
# level 2. Compilation dominates most tests on CPU (a TRADES step of a
# ResNet-10, compile and run: 100 s at level 2, 49 s at 0, 42 s at 1), while
# the training runs of test_training_e2e need fast code (a resumed run:
# 12 s at level 2, 63 s at 0, 15 s at 1). It computes the same functions
# (the tests' tolerances hold). Training commands that tests run in
# subprocesses inherit these flags (their states are compared bit for bit
# with in-process runs, and they share the compilation cache); the tests of
# the README's commands and of several processes use XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


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
