"""AutoAttack's components against torchattacks on the same trained weights.

A vanilla ResNet-10 (width 8) is PGD-trained here for 2 epochs on 4,000 real
Fashion-MNIST images, exported with ``models.export_torch_state_dict`` into
the PyTorch copy of ``tests/torch_resnet10.py``, and attacked at L-inf eps
0.1 (the Fashion-MNIST radius of ``configs/fmnist_resnet10.py``) on the same
test points: this project's APGD-CE, APGD-T, FAB-T, Square and standard
ensemble on the JAX model, torchattacks' APGD, APGDT, FAB (multi-targeted),
Square and AutoAttack("standard") on the PyTorch one. Robust accuracies must
agree within 1.5 points; per-example agreement is printed.

Budgets, the same on both sides, are the reference's 100 steps per run,
with 3 targets for APGD-T and FAB-T (9 in the standard version) and 500
Square queries (5,000) to bound the run time. torchattacks' AutoAttack
builds its components with 10 steps (the reference uses 100); they are set
to 100 here.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")

import jax  # noqa: E402

from cifs_jax import attacks  # noqa: E402
from tests.exported_resnet10 import to_torch  # noqa: E402

EPS = 0.1
NUM_POINTS = 200
SQUARE_QUERIES = 500
NUM_TARGETS = 3
# Largest allowed difference of robust accuracies (percentage points).
TOLERANCE = 1.5

pytestmark = pytest.mark.crosscheck


@pytest.fixture(scope="module")
def trained(exported_resnet10):
  """(JAX logits_fn, PyTorch model, x (N, 28, 28, 1), y (N,)) of the
  exported ResNet-10 (conftest.py), its first NUM_POINTS test points."""
  # One intra-op thread: a run with torch's default thread pool next to
  # JAX's aborted once inside torchattacks' FAB backward ("double free").
  torch.set_num_threads(1)
  logits_fn, torch_model, x, y = exported_resnet10
  return logits_fn, torch_model, x[:NUM_POINTS], y[:NUM_POINTS]


def jax_components():
  return {
    "APGD-CE": (attacks.apgd, attacks.APGDConfig(eps=EPS)),
    "APGD-T": (
      attacks.apgd_targeted,
      attacks.APGDConfig(eps=EPS, num_target_classes=NUM_TARGETS),
    ),
    "FAB-T": (
      attacks.fab_targeted,
      attacks.FABConfig(eps=EPS, num_target_classes=NUM_TARGETS),
    ),
    # torchattacks' Square rescales its window schedule to the query budget
    # (resc_schedule=True, its default, also inside its AutoAttack); the
    # official AutoAttack's, our default, does not.
    "Square": (
      attacks.square,
      attacks.SquareConfig(
        eps=EPS, num_queries=SQUARE_QUERIES, rescale_schedule=True
      ),
    ),
  }


def torch_components(model):
  standard = torchattacks.AutoAttack(
    model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0
  )
  components = standard._autoattack.attacks
  for component in components[:3]:
    component.steps = 100
  for component in components[1:3]:
    component.n_target_classes = NUM_TARGETS
  components[3].n_queries = SQUARE_QUERIES
  return dict(zip(["APGD-CE", "APGD-T", "FAB-T", "Square"], components)), (
    standard
  )


def jax_robust(logits_fn, x_adv, y):
  return np.asarray(np.argmax(logits_fn(x_adv)[0], -1) == y)


def torch_robust(model, x_adv, y):
  with torch.no_grad():
    return (model(x_adv).argmax(1) == torch.from_numpy(y)).numpy()


def comparison(name, ours, theirs):
  """A line: both robust accuracies (%) and the per-example agreement."""
  return (
    f"{name:8s} JAX {100 * ours.mean():6.2f} %  torchattacks "
    f"{100 * theirs.mean():6.2f} %  per-example agreement "
    f"{100 * np.mean(ours == theirs):6.2f} %"
  )


def test_components_and_ensemble_agree_with_torchattacks(trained):
  logits_fn, torch_model, x, y = trained
  x_torch, y_torch = to_torch(x), torch.from_numpy(y)
  clean = jax_robust(logits_fn, x, y)
  print(f"clean accuracy {100 * clean.mean():.2f} % on {len(y)} points")
  ours, theirs = {}, {}
  torch_attacks, torch_standard = torch_components(torch_model)
  for i, (name, (attack, config)) in enumerate(jax_components().items()):
    run = jax.jit(attack, static_argnums=(0, 4))
    x_adv = np.asarray(run(logits_fn, x, y, jax.random.key(i), config))
    ours[name] = jax_robust(logits_fn, x_adv, y) & clean
    adv = torch_attacks[name](x_torch, y_torch)
    theirs[name] = torch_robust(torch_model, adv, y) & clean
    print(comparison(name, ours[name], theirs[name]), flush=True)
  result = attacks.autoattack(
    logits_fn,
    x,
    y,
    jax.random.key(9),
    eps=EPS,
    components={
      name.lower(): (lambda s, c=component: c)
      for name, component in jax_components().items()
    },
  )
  ours["standard"] = result.robust
  adv = torch_standard(x_torch, y_torch)
  theirs["standard"] = torch_robust(torch_model, adv, y) & clean
  print(comparison("standard", ours["standard"], theirs["standard"]))
  for name in ours:
    assert abs(ours[name].mean() - theirs[name].mean()) * 100 <= TOLERANCE, (
      comparison(name, ours[name], theirs[name])
    )
  # The ensemble is at least as strong as each of its components.
  assert all(
    result.robust_accuracy <= 100 * ours[n].mean() for n in jax_components()
  )
