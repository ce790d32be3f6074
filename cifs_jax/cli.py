"""The command-line convention of the five entry points.

``cifs_jax.main``, ``cifs_jax.evaluate``, ``cifs_jax.analyze``,
``cifs_jax.report`` and ``cifs_jax.data.prepare`` all parse absl flags
through ``run(main)``, which

* rewrites pixel fractions: ``--config.attack.eps=8/255`` (any config key
  named ``eps`` or ``step_size``, ``PIXEL_KEYS``) arrives as its float;
* names an unknown ``--config.<key>`` in full;
* loads ``--config`` (its file and variants) while parsing, so a missing
  file or an unknown variant is a flag error;
* prints a user error -- a bad flag value, a missing required flag, an
  unknown name, an unusable path, a ``validation.UsageError`` raised by
  ``main`` or the library it calls -- as ONE line on stderr and exits with
  status 2, without a traceback.

The ``check_*`` functions test paths before any data is read or any model
compiled; they raise ``UsageError``. Paths with a scheme (``gs://...``) are
left to the storage layer.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags
import ml_collections

from cifs_jax import experiment_config
from cifs_jax.runs import directory as run_directory
from cifs_jax.validation import UsageError

USAGE_ERROR_STATUS = 2
# The status of a program ended by Ctrl-C (128 + SIGINT), as shells report.
INTERRUPTED_STATUS = 130
_OVERRIDE_PREFIX = "--config."
# Config leaves in pixel units (images in [0, 1]), which also take N/D.
_PIXEL_NAMES = ("eps", "step_size")
_FRACTION = re.compile(r"(\d+)/(\d+)")


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ""):
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_keys(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"


# Keys in pixel units of every config ("attack.eps", "attack.step_size").
PIXEL_KEYS = tuple(
  key
  for key in _leaf_keys(experiment_config.base_config())
  if key.rsplit(".", 1)[-1] in _PIXEL_NAMES
)


def unknown_override(argv: Sequence[str]) -> str | None:
  """The first ``--config.<key>`` of ``argv`` whose key no config has
  (every config file builds on ``experiment_config.base_config()``)."""
  reference = experiment_config.base_config()
  for arg in argv[1:]:
    if not arg.startswith(_OVERRIDE_PREFIX):
      continue
    key = arg[len(_OVERRIDE_PREFIX) :].split("=", 1)[0]
    node = reference
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return key
      node = node[part]
  return None


def pixel_value(key: str, text: str) -> str:
  """The value of ``--config.<key>=<text>`` for a key of ``PIXEL_KEYS``: a
  fraction of integers "N/D" as the text of its float, anything else as it
  is (absl parses it).

  Raises:
    UsageError: naming the key, for a "/" that is not such a fraction.
  """
  if "/" not in text:
    return text
  match = _FRACTION.fullmatch(text.strip())
  if match is None or int(match[2]) == 0:
    raise UsageError(
      f"--config.{key}={text}: write a number in [0, 1] (0.0314) or a "
      "fraction of integers N/D with D > 0 (8/255)."
    )
  return repr(int(match[1]) / int(match[2]))


def rewrite_pixel_fractions(argv: Sequence[str]) -> list[str]:
  """``argv`` with each ``--config.attack.eps=8/255`` (or ``--config.attack.eps
  8/255``) of a ``PIXEL_KEYS`` key as its float."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    for key in PIXEL_KEYS:
      flag = _OVERRIDE_PREFIX + key
      if arg.startswith(flag + "="):
        argv[i] = f"{flag}={pixel_value(key, arg[len(flag) + 1 :])}"
      elif arg == flag and i + 1 < len(argv):
        argv[i + 1] = pixel_value(key, argv[i + 1])
  return argv


def preprocess_argv(argv: Sequence[str]) -> list[str]:
  """The command line as absl should parse it: pixel fractions rewritten.

  Raises:
    UsageError: for an unknown ``--config.<key>`` (naming the whole key;
      ml_collections would raise a bare KeyError naming only its last part)
      or a bad pixel fraction.
  """
  key = unknown_override(argv)
  if key is not None:
    raise UsageError(
      f"unknown config key config.{key} (in --config.{key}); see "
      "cifs_jax/experiment_config.py for the keys."
    )
  return rewrite_pixel_fractions(argv)


def fail(message: str) -> NoReturn:
  """Ends the program for a user error: one line, status 2."""
  message = " ".join(str(message).split())  # one line
  sys.stderr.write(f"error: {message}\n")
  sys.exit(USAGE_ERROR_STATUS)


def _last_line(message: str) -> str:
  """The last non-empty line of ``message`` (ml_collections puts a whole
  traceback into the message of a config file that fails to load)."""
  lines = [line for line in str(message).splitlines() if line.strip()]
  return lines[-1].strip() if lines else ""


def parse_flags(argv: Sequence[str]) -> list[str]:
  """``preprocess_argv`` then absl's parsing of ``argv`` (and, if defined,
  the loading of ``--config``); returns the positional arguments. Any error
  is a user error (``fail``)."""
  try:
    remaining = flags.FLAGS(preprocess_argv(argv))
  except UsageError as e:
    fail(str(e))
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:
      message = f"{message.split(':', 1)[0]}: {_last_line(message)}"
    fail(f"{message} (--helpshort lists the flags)")
  if "config" in flags.FLAGS and flags.FLAGS.config is not None:
    try:  # config_flags loads the file on first use
      flags.FLAGS.config.keys()
    except (OSError, ValueError, KeyError) as e:
      fail(f"--config: {_last_line(e)}")
  return remaining


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` under this module's convention (module docstring).
  ``main`` receives the positional arguments (argv[0] first)."""

  def guarded_main(argv: list[str]) -> None:
    try:
      main(argv)
    except (UsageError, app.UsageError) as e:
      fail(str(e))
    except KeyboardInterrupt as e:
      # One line, no traceback; os._exit does not wait for a computation
      # still running on the device (nothing is left to write).
      sys.stderr.write(f"\n{e or 'Interrupted.'}\n")
      sys.stderr.flush()
      os._exit(INTERRUPTED_STATUS)

  app.run(guarded_main, flags_parser=parse_flags)


def no_positional_arguments(argv: Sequence[str]) -> None:
  """Raises UsageError if ``argv`` (absl's remainder) has more than argv[0]."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {list(argv[1:])}.")


def validated_config(
  config: ml_collections.ConfigDict | None,
) -> ml_collections.ConfigDict | None:
  """``config`` checked by ``experiment_config.validate`` (None as is).

  Raises:
    UsageError: naming the bad key or value.
  """
  if config is not None:
    try:
      experiment_config.validate(config)
    except (KeyError, ValueError) as e:
      raise UsageError(e.args[0] if e.args else str(e)) from e
  return config


def check_writable_directory(flag: str, path: str | os.PathLike) -> None:
  """``directory.check_writable_directory`` for the path of flag ``flag``.

  Raises:
    UsageError: naming ``flag`` and what is wrong with ``path``.
  """
  try:
    run_directory.check_writable_directory(path)
  except OSError as e:
    raise UsageError(f"--{flag}={e}") from e


def check_run_directory(
  flag: str,
  path: str | os.PathLike,
  *,
  needs_config: bool = True,
  needs_checkpoints: bool = True,
) -> None:
  """Checks that ``path`` is an existing run directory, with its config if
  ``needs_config`` and its checkpoints if ``needs_checkpoints``. Reads
  nothing.

  Raises:
    UsageError: naming ``flag`` and ``path``.
  """
  if run_directory.is_remote(path):
    return
  run = run_directory.RunDirectory(path)
  if not run.path.is_dir():
    state = "is not a directory" if run.path.exists() else "does not exist"
    raise UsageError(
      f"--{flag}={run.path} {state}; point it at a training run."
    )
  if needs_config and not run.config_path.is_file():
    raise UsageError(
      f"--{flag}={run.path} has no {run.config_path.name}: it is not a "
      "training run's directory."
    )
  if needs_checkpoints and not run.checkpoints_path.is_dir():
    raise UsageError(
      f"--{flag}={run.path} has no {run.checkpoints_path.name}/: the run "
      "has not saved a checkpoint yet."
    )
