"""The paper's published accuracies (%), for comparison with our runs.

Typed from Yan et al., ICML 2021 (/work/shared/paper/cifs-icml2021.txt):
Table 1 (CIFAR-10, PGD-AT), Table 2 (SVHN, PGD-AT), Table 3 (CIFAR-10,
FAT); "last epoch" results with eps 8/255, worst case over the adaptive
beta_atk (Section 4.1). Keys are (dataset, model, defence, training method)
as ``runs.run_setting`` names them ("cifs" is the paper's softmax top-2);
columns are the attack names of ``evaluation.protocols`` and "natural".
The Fashion-MNIST results are in the paper's Appendix D, which our copy does
not contain.
"""

from __future__ import annotations

import dataclasses

COLUMNS = ("natural", "fgsm", "pgd20", "cw", "pgd100")


@dataclasses.dataclass(frozen=True)
class PublishedResult:
  """One row of a table of the paper.

  Attributes:
    source: where it is printed, e.g. "Table 1".
    eps: the L-inf radius of every attack.
    accuracies: {column of ``COLUMNS``: top-1 in %}.
  """

  source: str
  eps: float
  accuracies: dict[str, float]


def _row(source: str, *values: float) -> PublishedResult:
  return PublishedResult(source, 8 / 255, dict(zip(COLUMNS, values)))


PUBLISHED = {
  ("cifar10", "resnet18", "none", "pgd_at"): _row(
    "Table 1", 84.56, 55.11, 46.62, 45.95, 44.72
  ),
  ("cifar10", "resnet18", "cas", "pgd_at"): _row(
    "Table 1", 86.73, 55.99, 45.29, 44.18, 43.22
  ),
  ("cifar10", "resnet18", "cifs", "pgd_at"): _row(
    "Table 1", 83.86, 58.86, 51.23, 50.16, 48.70
  ),
  ("cifar10", "wrn28_10", "none", "pgd_at"): _row(
    "Table 1", 87.29, 58.50, 49.17, 48.68, 47.08
  ),
  ("cifar10", "wrn28_10", "cas", "pgd_at"): _row(
    "Table 1", 88.05, 57.94, 49.03, 47.97, 47.25
  ),
  ("cifar10", "wrn28_10", "cifs", "pgd_at"): _row(
    "Table 1", 85.56, 61.34, 53.74, 53.20, 51.51
  ),
  ("svhn", "resnet18", "none", "pgd_at"): _row(
    "Table 2", 93.72, 65.87, 50.35, 47.89, 45.81
  ),
  ("svhn", "resnet18", "cas", "pgd_at"): _row(
    "Table 2", 94.08, 65.24, 48.47, 46.15, 43.75
  ),
  ("svhn", "resnet18", "cifs", "pgd_at"): _row(
    "Table 2", 93.94, 66.24, 52.02, 50.13, 47.49
  ),
  ("cifar10", "resnet18", "none", "fat"): _row(
    "Table 3", 87.16, 56.43, 47.64, 46.01, 45.35
  ),
  ("cifar10", "resnet18", "cifs", "fat"): _row(
    "Table 3", 86.35, 59.47, 51.68, 51.84, 49.52
  ),
  ("cifar10", "wrn28_10", "none", "fat"): _row(
    "Table 3", 88.37, 58.81, 49.62, 48.49, 47.58
  ),
  ("cifar10", "wrn28_10", "cifs", "fat"): _row(
    "Table 3", 86.74, 60.67, 51.99, 52.34, 49.87
  ),
}


def published(setting: dict) -> PublishedResult | None:
  """The paper's row for a run's setting (``runs.run_setting``), if any."""
  key = tuple(setting[k] for k in ("dataset", "model", "defense", "method"))
  return PUBLISHED.get(key)
