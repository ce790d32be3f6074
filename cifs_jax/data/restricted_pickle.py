"""Unpickling that cannot run code: plain containers, bytes, numeric arrays.

A pickle names the callables that rebuild its objects, and `pickle.load`
imports and calls whatever it names, so a tampered file runs arbitrary code.
`loads` admits only the names that numpy and Python write for numeric arrays
and bytes, and maps each to a checked stand-in, never to numpy's own
callable: ``numpy.ndarray(shape, dtype, buffer, offset, strides)`` would view
caller bytes as object pointers (a crash) or with zero strides, and
``numpy.dtype``'s pickled state can declare hidden object fields or fields
past the item size. Instead:

- a dtype is one of the built-in numeric dtypes (bool, integers, floats,
  complex), looked up by name; its pickled state may only set the byte order;
- an array is rebuilt with `np.frombuffer` from its pickled (dtype, shape,
  bytes), after checking that the bytes are exactly shape x item size;
- ``_codecs.encode`` and ``__builtin__.bytes`` (bytes in protocols 0-2)
  only encode text as latin-1 and make b"".

Lists, dicts, tuples, sets, str, bytes and numbers need no global at all.
Before unpickling, `loads` checks every opcode's declared length and memo
index against the data, since the C unpickler allocates what they declare
(a 15-byte pickle can otherwise claim 8 GiB), and counts the opcodes against
the caller's bound: each opcode builds at most one object, and a one-byte
EMPTY_SET builds a 216-byte set, so a 64 MB file of them would otherwise
build 16 GB. Anything else raises `pickle.UnpicklingError`.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

_DTYPES = {
  name: np.dtype(name)
  for name in (
    "b1",
    "i1",
    "u1",
    "i2",
    "u2",
    "i4",
    "u4",
    "i8",
    "u8",
    "f2",
    "f4",
    "f8",
    "c8",
    "c16",
  )
}
_BYTE_ORDERS = ("<", ">", "=", "|")
_PUT_OPCODES = ("PUT", "BINPUT", "LONG_BINPUT")


def _refuse(message: str) -> pickle.UnpicklingError:
  return pickle.UnpicklingError(f"refusing {message}")


class _Dtype:
  """A numeric dtype named by a pickle; `dtype` is the checked result."""

  __hash__ = None  # Cannot be a dict key or set member.

  def __init__(self, name: Any, align: Any = False, copy: Any = False):
    del align, copy  # Irrelevant for built-in numeric dtypes.
    if not isinstance(name, str) or name not in _DTYPES:
      raise _refuse(
        f"dtype {name!r}: only bool, integer, float and complex "
        "dtypes are allowed"
      )
    self.dtype = _DTYPES[name]

  def __setstate__(self, state: Any) -> None:
    """Takes the byte order from numpy's state; refuses fields or subarrays.

    Numpy writes (version, byte order, subarray, names, fields, item size,
    alignment, flags[, metadata]); the rest is implied by the dtype's name.
    """
    if (
      not isinstance(state, tuple)
      or len(state) not in (8, 9)
      or state[1] not in _BYTE_ORDERS
      or state[2:5] != (None,) * 3
    ):
      raise _refuse(
        f"dtype state {state!r} of {self.dtype}: only a byte "
        "order, no fields or subarrays"
      )
    self.dtype = self.dtype.newbyteorder(state[1])


def _array(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
  """Views ``buffer`` as an array, once its size matches dtype and shape."""
  if not isinstance(dtype, _Dtype):
    raise _refuse(f"array dtype {dtype!r}: not a pickled numeric dtype")
  if not (
    isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
  ):  # pylint: disable=unidiomatic-typecheck
    raise _refuse(f"array shape {shape!r}: not a tuple of sizes")
  if not isinstance(buffer, (bytes, bytearray)):
    raise _refuse(f"array data of type {type(buffer).__name__}")
  if len(buffer) != math.prod(shape) * dtype.dtype.itemsize:
    raise _refuse(
      f"array: {len(buffer)} data bytes for shape {shape} of {dtype.dtype}"
    )
  return np.frombuffer(buffer, dtype.dtype).reshape(shape, order=order)


class _PendingArray:
  """What numpy's `_reconstruct` makes (protocols 0-4); the array comes with
  the state that pickle sets next, and `_resolve` puts it in its place."""

  __hash__ = None
  array = None

  def __setstate__(self, state: Any) -> None:
    """Builds the array from numpy's (1, shape, dtype, is_fortran, bytes)."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
      raise _refuse(
        "an array state other than numpy's (1, shape, dtype, is_fortran, data)"
      )
    _, shape, dtype, fortran, buffer = state
    self.array = _array(buffer, dtype, shape, "F" if fortran else "C")


class _NdarrayName:
  """Stands for ``numpy.ndarray``, only as `_reconstruct`'s first argument."""

  def __call__(self, *args: Any) -> None:
    raise _refuse(
      "numpy.ndarray(...): arrays are only rebuilt from their pickled data"
    )


_NDARRAY = _NdarrayName()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
  if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
    raise _refuse(f"_reconstruct{(subtype, shape, typecode)!r}")
  return _PendingArray()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """numpy's protocol-5 array: (data, dtype, shape, order)."""
  if order not in ("C", "F"):
    raise _refuse(f"array order {order!r}")
  return _array(buffer, dtype, shape, order)


def _encode(text: Any, encoding: Any) -> bytes:
  """What Python writes for bytes in protocols 0-2: (text, 'latin1')."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _refuse(f"_codecs.encode(..., {encoding!r}): only text as latin1")
  return codecs.encode(text, "latin1")


def _empty_bytes() -> bytes:
  """What Python writes for b"" in protocols 0-2: bytes()."""
  return b""


_ALLOWED = {
  # numpy < 2 wrote `numpy.core`, numpy >= 2 writes `numpy._core`.
  ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy.core.numeric", "_frombuffer"): _frombuffer,
  ("numpy._core.numeric", "_frombuffer"): _frombuffer,
  ("numpy", "ndarray"): _NDARRAY,
  ("numpy", "dtype"): _Dtype,
  ("_codecs", "encode"): _encode,
  ("__builtin__", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise _refuse(
        f"global '{module}.{name}': only plain containers, "
        "bytes and numeric numpy arrays are allowed"
      ) from None


def _check_opcodes(data: bytes, max_opcodes: int) -> None:
  """Refuses lengths past the end of ``data``, memo indices past the opcode
  count (Python's pickler numbers memo entries from 0) and more than
  ``max_opcodes`` opcodes, before the C unpickler allocates anything."""
  try:
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
      if count >= max_opcodes:
        raise _refuse(
          f"more than {max_opcodes} opcodes (each can build an object)"
        )
      if opcode.name in _PUT_OPCODES and arg > count:
        raise _refuse(f"memo index {arg} at opcode {count}")
  except ValueError as e:  # What genops raises for malformed data.
    raise pickle.UnpicklingError(f"malformed pickle: {e}") from e


def _resolve(value: Any, done: dict[int, tuple[Any, Any]]) -> Any:
  """Puts arrays and dtypes in place of their stand-ins in ``value``.

  Lists and dicts are updated in place, tuples rebuilt where they changed;
  ``done`` maps the id of each container visited to (it, its result), so
  shared and recursive structures are visited once.
  """
  if isinstance(value, _PendingArray):
    if value.array is None:
      raise _refuse("array without its state")
    return value.array
  if isinstance(value, _Dtype):
    return value.dtype
  if not isinstance(value, (list, dict, tuple)):
    return value
  if id(value) in done:
    return done[id(value)][1]
  if isinstance(value, tuple):
    resolved = tuple(_resolve(item, done) for item in value)
    if all(a is b for a, b in zip(resolved, value)):
      resolved = value
    done[id(value)] = (value, resolved)
    return resolved
  done[id(value)] = (value, value)
  keys = range(len(value)) if isinstance(value, list) else list(value)
  for key in keys:
    value[key] = _resolve(value[key], done)
  return value


def loads(data: bytes, *, max_opcodes: int) -> Any:
  """Unpickles ``data`` (Python 2 strings become bytes), refusing code.

  Args:
    data: the pickle.
    max_opcodes: the most opcodes the caller's data can need; each builds at
      most one object, so this bounds the memory beyond ``len(data)`` to
      about 250 bytes per opcode (a set, the largest empty object).

  Returns:
    The unpickled value. Arrays come back read-only when their pickled data
    was bytes (protocols 0-4).

  Raises:
    pickle.UnpicklingError: saying what was refused.
  """
  _check_opcodes(data, max_opcodes)
  value = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
  return _resolve(value, {})
