"""Keeps third-party log lines (Orbax, TensorStore, JAX, ...) off the console.

Orbax alone logs about 60 INFO lines per checkpoint save, which bury the
progress bar and the results. ``quiet(level)`` drops the records of
installed packages (files under ``site-packages`` / ``dist-packages``, other
than ``cifs_jax`` itself) below ``level``; this project's own records pass.
Below "info", it also drops the warnings that Orbax gives for what this
project does on purpose (``EXPECTED_WARNINGS``). The entry points call
``quiet_from_flags()`` (flag ``--library_verbosity``).
"""

from __future__ import annotations

import logging
import pathlib

from absl import flags
from absl import logging as absl_logging

LEVELS = {
  "debug": logging.DEBUG,
  "info": logging.INFO,
  "warning": logging.WARNING,
  "error": logging.ERROR,
}
_VERBOSITY = flags.DEFINE_enum(
  "library_verbosity",
  "warning",
  list(LEVELS),
  "The lowest level of third-party log lines shown (Orbax, JAX, ...); "
  "info brings back Orbax's lines for every checkpoint.",
)
_INSTALL_DIRS = ("site-packages", "dist-packages")
# Third-party warnings about what the project does on purpose: evaluation
# opens checkpoints read-only; a save on SIGTERM mid-epoch has no metrics
# (so it never ranks as best).
EXPECTED_WARNINGS = (
  "Given directory is read only",
  "Requested `tracked_metric`; did not provide metrics.",
)
_OWN_PACKAGE = "cifs_jax"


def installed_package(pathname: str) -> str | None:
  """The top-level package of an installed file, e.g.
  ".../site-packages/orbax/checkpoint/x.py" -> "orbax"; None elsewhere."""
  parts = pathlib.PurePath(pathname).parts
  for directory, package in zip(parts[:-1], parts[1:]):
    if directory in _INSTALL_DIRS:
      return package
  return None


class LibraryFilter(logging.Filter):
  """Passes this project's records and third-party records at ``level`` or
  above."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    package = installed_package(record.pathname)
    if package in (None, _OWN_PACKAGE):
      return True
    if self.level > logging.INFO and record.levelno == logging.WARNING:
      message = str(record.msg)
      if any(message.startswith(w) for w in EXPECTED_WARNINGS):
        return False
    return record.levelno >= self.level


def quiet(level_name: str = "warning") -> LibraryFilter:
  """Drops third-party records below ``level_name`` (a key of ``LEVELS``)
  from absl's handler, which prints every record (absl's and Python's) on
  the console; returns the installed filter."""
  library_filter = LibraryFilter(LEVELS[level_name])
  absl_logging.get_absl_handler().addFilter(library_filter)
  return library_filter


def quiet_from_flags() -> LibraryFilter:
  """``quiet`` at the level of the ``--library_verbosity`` flag."""
  return quiet(_VERBOSITY.value)
