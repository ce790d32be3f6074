"""Standard AutoAttack against the official code, point for point.

The official code is fra31/auto-attack as packaged on PyPI (pyautoattack
0.2.0, requirements-crosscheck.txt). Both run the standard version (APGD-CE,
APGD-T with 9 targets, FAB-T with 9 targets, Square with 5,000 queries; the
official budgets, unchanged) at L-inf eps 0.1 on the same 300 real
Fashion-MNIST test points of the exported width-8 ResNet-10 (conftest.py):
the official code on the PyTorch copy, ``attacks.autoattack`` on the JAX
model. The whole robust accuracies must agree within 1 point, the
per-example robust flags after the clean pass must be identical, and after
APGD-CE and after APGD-T differ in at most one point each.

Measured (2-core CPU), on the model trained then:
- 2026-12-03: clean 69.00 % both; APGD-CE 30.00 % both, 0 points differ;
  APGD-T official 28.00 %, ours 28.33 %, 1 point differs; FAB-T and
  Square fool nothing more on either side, so the whole robust accuracy is
  28.00 % official, 28.33 % ours.
- 2026-12-07 (the single-channel stem now a shifted sum, so training
  rounds differently and trains another model): APGD-CE official 20.67 %,
  ours 21.00 %, 1 point differs; APGD-T 20.00 % and 19.67 %, 1 point
  differs; whole 20.00 % and 19.67 %.
The differing points: APGD starts from a uniform random point of the ball,
drawn from torch's generator there and from JAX's here, so the two runs
climb from different starts; a point on the edge (fooled from one start,
not from the other) is the only kind of difference the algorithm leaves.
FAB-T and Square are random searches with different random streams, so
after them only the accuracy is compared.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip(
  "pyautoattack", reason="the official AutoAttack: requirements-crosscheck.txt"
)

import jax  # noqa: E402

from cifs_jax import attacks  # noqa: E402
from tests.exported_resnet10 import official_autoattack  # noqa: E402

EPS = 0.1
# Largest allowed difference of whole robust accuracies (percentage points).
TOLERANCE = 1.0
# Points whose robust flag after APGD-CE, and after APGD-T, may differ
# (random starts differ).
RANDOM_START_DIFFERENCES = 1

pytestmark = pytest.mark.crosscheck


def test_standard_autoattack_matches_official(exported_resnet10):
  logits_fn, torch_model, x, y = exported_resnet10
  assert len(y) >= 300
  torch.set_num_threads(1)
  theirs, _ = official_autoattack(torch_model, x, y, EPS)
  ours = attacks.autoattack(logits_fn, x, y, jax.random.key(0), eps=EPS)
  for stage in theirs:
    print(
      f"{stage:8s} official {100 * theirs[stage].mean():6.2f} %  "
      f"ours {ours.accuracy[stage]:6.2f} %  differing points "
      f"{int(np.sum(theirs[stage] != ours.robust_after[stage]))}"
    )
  assert list(ours.robust_after) == list(theirs)
  np.testing.assert_array_equal(ours.robust_after["clean"], theirs["clean"])
  for stage in ("apgd-ce", "apgd-t"):
    differing = np.sum(ours.robust_after[stage] != theirs[stage])
    assert differing <= RANDOM_START_DIFFERENCES, stage
  assert abs(ours.robust_accuracy - 100 * theirs["square"].mean()) <= (
    TOLERANCE
  )


def test_the_component_benchmark_times_the_official_code_the_same_way(
  tmp_path,
):
  """``benchmarks.autoattack --official``: each official component timed on
  the same reduced budget as ours, scaled to the same full budget."""
  import json  # noqa: PLC0415

  from benchmarks import autoattack as benchmark  # noqa: PLC0415

  output = tmp_path / "autoattack.json"
  benchmark.main(["--smoke", "--official", "--output", str(output)])
  results = json.loads(output.read_text())["results"]
  ours, official = results["components"], results["official"]["components"]
  assert list(official) == list(ours)
  for name, component in official.items():
    assert component["timed_s"] > 0
    assert component["full_s_per_1000_images"] == pytest.approx(
      component["timed_s"]
      / ours[name]["timed_iterations"]
      * ours[name]["full_iterations"]
      * 1000
      / 2,  # the smoke batch
      rel=1e-3,
    )
