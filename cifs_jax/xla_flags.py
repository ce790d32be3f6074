"""The XLA flag cifs_jax sets for speed on CPU, before JAX starts a backend.

jaxlib 0.10 and 0.11 run large CPU convolutions through YNNPACK by default.
For ResNet-18's convolutions XLA's other path (Eigen) is faster on the
2-core x86_64 CPU we measured, at batch 128: 1.55x for the forward pass,
1.26x for input gradients and 2.19x for weight gradients; the CIFS PGD-10
AT step went from 13.9 to 10.6 s (``benchmarks/README.md``, "The kernels
alone" and "Side by side"). ``import cifs_jax`` therefore
appends ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
to ``XLA_FLAGS``, which moves convolutions alone off YNNPACK. It does
nothing

- when ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type``
  (your own choice wins: ``--xla_cpu_experimental_ynn_fusion_type=
  individual_convolution`` keeps YNNPACK's convolutions);
- with a jaxlib outside the versions it was tested with (XLA refuses
  unknown flags, and the flag is experimental);
- once JAX has started its CPU backend (XLA reads the flags then): import
  cifs_jax before your first JAX computation, or set the flag yourself.

GPU and TPU backends ignore the flag.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

YNN_FUSION_TYPE = "--xla_cpu_experimental_ynn_fusion_type"
CONVOLUTIONS_OFF_YNNPACK = f"{YNN_FUSION_TYPE}=-individual_convolution"
# jaxlib versions (prefixes) known to have the flag (0.10.2 measured here).
TESTED_JAXLIB = ("0.10.", "0.11.")


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def prefer_eigen_convolutions_on_cpu(
  environ: MutableMapping[str, str] = os.environ,
  jaxlib_version: str | None = None,
) -> bool:
  """Appends ``CONVOLUTIONS_OFF_YNNPACK`` to ``environ["XLA_FLAGS"]`` unless
  the flags already set YNNPACK's fusion types or jaxlib is untested.

  Returns whether it changed ``environ``.
  """
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_TYPE in flags or not version.startswith(TESTED_JAXLIB):
    return False
  environ["XLA_FLAGS"] = f"{flags} {CONVOLUTIONS_OFF_YNNPACK}".strip()
  return True
