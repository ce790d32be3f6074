"""The evaluation protocols and their attacks, by name.

The config layer validates ``eval.final_protocol`` and ``eval.final_attacks``
against this table without importing the evaluation package, which builds
the protocols themselves (``evaluation.protocols.PROTOCOLS``; a test checks
that the two agree).
"""

from __future__ import annotations

from typing import Sequence

# Protocol name -> its attacks, in the order the protocol runs them.
PROTOCOL_ATTACKS = {
  "paper": ("fgsm", "pgd20", "cw", "pgd100"),
  "strong": ("fgsm", "pgd20", "cw", "pgd100"),
  "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
  "autoattack-joint": ("apgd-ce", "square"),
}


def check_attacks(protocol: str, attack_names: Sequence[str]) -> None:
  """Raises ValueError naming an unknown protocol, or the attacks of
  ``attack_names`` that ``protocol`` does not have (with the ones it has)."""
  if protocol not in PROTOCOL_ATTACKS:
    raise ValueError(
      f"Unknown protocol {protocol!r}; choose one of {tuple(PROTOCOL_ATTACKS)}."
    )
  unknown = sorted(set(attack_names) - set(PROTOCOL_ATTACKS[protocol]))
  if unknown:
    raise ValueError(
      f"Unknown attack(s) {unknown}; the {protocol!r} protocol has "
      f"{sorted(PROTOCOL_ATTACKS[protocol])}."
    )
