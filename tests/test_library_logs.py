"""Tests of cifs_jax.library_logs: Orbax's expected warnings stay quiet."""

import logging

import pytest

from cifs_jax import library_logs

ORBAX_FILE = "/venv/lib/python3.11/site-packages/orbax/checkpoint/x.py"


def _warning(message: str, *args) -> logging.LogRecord:
  return logging.LogRecord(
    "absl", logging.WARNING, ORBAX_FILE, 1, message, args, None
  )


@pytest.mark.parametrize(
  "message,args",
  [
    ("Given directory is read only=%s", ("/runs/a/checkpoints",)),
    ("Requested `tracked_metric`; did not provide metrics.", ()),
  ],
)
def test_orbax_warnings_about_intended_use_are_dropped_unless_asked_for(
  message, args
):
  assert not library_logs.LibraryFilter(logging.WARNING).filter(
    _warning(message, *args)
  )
  assert library_logs.LibraryFilter(logging.INFO).filter(
    _warning(message, *args)
  )


def test_other_orbax_warnings_pass():
  assert library_logs.LibraryFilter(logging.WARNING).filter(
    _warning("Checkpoint step %d is missing its metadata.", 3)
  )
