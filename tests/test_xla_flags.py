"""The CPU convolution flag that ``import cifs_jax`` sets."""

import os
import subprocess
import sys

import pytest

from cifs_jax import xla_flags

OFF = xla_flags.CONVOLUTIONS_OFF_YNNPACK


def test_the_flag_is_appended_to_the_users_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.prefer_eigen_convolutions_on_cpu(environ, "0.10.2")
  assert environ["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=2",
    OFF,
  ]
  environ = {}
  assert xla_flags.prefer_eigen_convolutions_on_cpu(environ, "0.11.0")
  assert environ == {"XLA_FLAGS": OFF}


@pytest.mark.parametrize(
  "environ, version",
  [
    # The user's own choice of YNNPACK fusions wins.
    (
      {"XLA_FLAGS": f"{xla_flags.YNN_FUSION_TYPE}=individual_convolution"},
      "0.10.2",
    ),
    # An untested jaxlib may not know the flag (XLA refuses unknown flags).
    ({}, "0.9.0"),
    ({}, ""),
  ],
)
def test_the_flags_are_left_alone(environ, version):
  before = dict(environ)
  assert not xla_flags.prefer_eigen_convolutions_on_cpu(environ, version)
  assert environ == before


# A ResNet-18 first-stage weight gradient at batch 32: large enough that
# XLA hands it to YNNPACK when allowed.
_PROGRAM = """
import cifs_jax
import jax, jax.numpy as jnp
from jax import lax
conv = lambda x, w: lax.conv_general_dilated(
  x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=1))
text = grad.lower(
  jnp.ones((32, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print("__ynn_fusion" in text)
"""


def _uses_ynnpack(xla_flags_value):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if xla_flags_value is not None:
    env["XLA_FLAGS"] = xla_flags_value
  result = subprocess.run(
    [sys.executable, "-c", _PROGRAM],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return result.stdout.strip().splitlines()[-1] == "True"


def test_import_moves_cpu_convolutions_off_ynnpack():
  if not _uses_ynnpack(f"{xla_flags.YNN_FUSION_TYPE}=individual_convolution"):
    pytest.skip("this CPU's XLA does not run this convolution on YNNPACK")
  assert not _uses_ynnpack(None)
