"""Checks of user-supplied settings whose errors name the setting."""

from __future__ import annotations

from typing import Any

import ml_collections


class UsageError(ValueError):
  """A user error (a bad setting, name or path) whose message says what to
  change; the entry points print it as one line and exit with status 2
  (``cifs_jax.cli``). A ValueError, for callers that catch those."""


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
  """Raises UsageError naming ``name`` and the allowed values."""
  if value not in allowed:
    raise UsageError(
      f"{name}={value!r} is not supported; choose one of {allowed}."
    )


def check_known_keys(
  config: ml_collections.ConfigDict,
  reference: ml_collections.ConfigDict,
  prefix: str = "",
) -> None:
  """Raises KeyError for any key of ``config`` (recursively) not in
  ``reference``, naming the full key and the allowed ones."""
  for key, value in config.items():
    if key not in reference:
      raise KeyError(
        f"Unknown config key '{prefix}{key}'; allowed keys "
        f"here: {sorted(reference.keys())}."
      )
    if isinstance(value, ml_collections.ConfigDict):
      check_known_keys(value, reference[key], f"{prefix}{key}.")
