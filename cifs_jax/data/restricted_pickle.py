"""Unpickling that cannot run code: plain containers, bytes and numpy arrays.

A pickle names the callables that rebuild its objects, and `pickle.load`
imports and calls whatever it names, so a tampered file runs arbitrary code.
`loads` admits only the few globals that numpy arrays need (plus
`_codecs.encode`, which Python 3 writes for bytes in protocols 0-2); lists,
dicts, tuples, str, bytes and numbers need no global at all. Anything else
raises `pickle.UnpicklingError` before it is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

# How numpy rebuilds arrays: pickle protocols 0-4, and 5.
_RECONSTRUCT = np.zeros(1).__reduce_ex__(4)[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_ALLOWED = {
    # numpy < 2 wrote `numpy.core`, numpy >= 2 writes `numpy._core`.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load global '{module}.{name}': only plain "
          "containers, bytes and numpy arrays are allowed") from None


def loads(data: bytes) -> Any:
  """Unpickles ``data`` (Python 2 strings become bytes), refusing code."""
  return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
