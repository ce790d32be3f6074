"""Test configuration: two fake CPU devices, float64 on demand."""

import jax
import pytest

# Must run before any JAX computation initialises the CPU backend.
jax.config.update("jax_num_cpu_devices", 2)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
