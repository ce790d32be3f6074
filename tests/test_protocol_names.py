"""The config layer's table of protocols agrees with the protocols built."""

import pytest

from cifs_jax import protocol_names
from cifs_jax.evaluation import protocols


def test_the_table_names_every_protocol_and_its_attacks_in_order():
  built = {
    name: tuple(attack.name for attack in make().attacks)
    for name, make in protocols.PROTOCOLS.items()
  }
  assert built == protocol_names.PROTOCOL_ATTACKS


def test_unknown_protocol_and_attacks_are_named():
  with pytest.raises(ValueError, match=r"Unknown protocol 'fast'"):
    protocol_names.check_attacks("fast", ())
  with pytest.raises(ValueError, match=r"\['pgd200'\].*'paper' protocol"):
    protocol_names.check_attacks("paper", ("pgd20", "pgd200"))
  protocol_names.check_attacks("autoattack", ("square", "apgd-t"))
