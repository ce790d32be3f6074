"""AutoAttack as evaluation protocols: components, runs, stages, report."""

import dataclasses
import math
from unittest import mock

import numpy as np
import pytest

from cifs_jax import attacks, evaluation
from cifs_jax.attacks.autoattack import HOST_LOOPS
from cifs_jax.evaluation import summary
from tests.test_evaluation import NUM_CLASSES, _evaluate, _model, _protocol

# Budgets small enough for a test; K = 4 classes leave 3 targets.
REDUCED = dict(num_target_classes=NUM_CLASSES - 1, square_queries=20)


def _reduced_protocol(version="standard", betas=(0.0, math.inf)):
  protocol = evaluation.protocols.autoattack_protocol(
    eps=0.1, version=version, **REDUCED
  )
  return evaluation.Protocol(
    protocol.name,
    tuple(_fewer_steps(attack) for attack in protocol.attacks),
    protocol.gradient_modes,
    betas,
    cascade=protocol.cascade,
  )


def _fewer_steps(attack):
  """The component with 3 gradient steps (APGD and FAB-T)."""
  if not hasattr(attack.config, "num_steps"):
    return attack
  return dataclasses.replace(
    attack, config=dataclasses.replace(attack.config, num_steps=3)
  )


def test_autoattack_protocols_follow_the_reference_and_the_authors():
  standard = evaluation.PROTOCOLS["autoattack"](eps=8 / 255)
  assert [a.label for a in standard.attacks] == [
    "APGD-CE",
    "APGD-T",
    "FAB-T",
    "Square",
  ]
  apgd_ce, apgd_t, fab_t, square = standard.attacks
  assert (apgd_ce.config.num_steps, apgd_ce.config.num_restarts) == (100, 1)
  assert apgd_t.config.loss == "dlr-targeted"
  assert fab_t.config.num_target_classes == 9
  assert square.config.num_queries == 5000
  joint = evaluation.PROTOCOLS["autoattack-joint"](eps=8 / 255)
  assert [a.name for a in joint.attacks] == ["apgd-ce", "square"]
  assert joint.attacks[0].config.num_restarts == 5
  assert standard.gradient_modes == joint.gradient_modes == ("stop", "full")


def test_only_apgd_ce_runs_per_beta_and_square_once():
  protocol = _reduced_protocol(betas=(0.0, 1.0, math.inf))
  runs = evaluation.protocol_runs(protocol, num_probes=2)
  per_attack = {
    a.name: sorted(
      (r.beta, r.probe or 0, r.gradient) for r in runs if r.attack is a
    )
    for a in protocol.attacks
  }
  # 5 targets (3 betas, each of 2 probes alone) x 2 gradient modes.
  assert len(per_attack["apgd-ce"]) == 10
  for name in ("apgd-t", "fab-t"):
    assert per_attack[name] == [(0.0, 0, "full"), (0.0, 0, "stop")]
  assert per_attack["square"] == [(0.0, 0, "stop")]


def test_stages_are_the_cumulative_worst_case_with_the_clean_input():
  protocol = evaluation.Protocol(
    "test",
    (_reduced_protocol().attacks[0], _reduced_protocol().attacks[3]),
    ("stop",),
    (0.0,),
  )
  runs = evaluation.protocol_runs(protocol, num_probes=0)
  # Final-head ranks of 4 examples: the clean input misclassifies example 2
  # (which the first attack "repairs": it still counts as non-robust).
  clean = np.array([[0], [0], [1], [0]])
  ranks = {runs[0].name: np.array([[0], [1], [0], [0]])}
  ranks[runs[1].name] = np.array([[0], [0], [0], [3]])
  results = summary.summarize(
    protocol,
    runs,
    labels=np.zeros(4, int),
    clean_ranks=clean,
    run_ranks=ranks,
    num_classes=NUM_CLASSES,
  )
  assert results["stages"] == {"clean": 75.0, "apgd-ce": 50.0, "square": 25.0}


@pytest.mark.slow
def test_evaluating_the_standard_protocol_on_a_model_with_probes():
  _, fns = _model()
  protocol = _reduced_protocol()
  results = _evaluate(fns, protocol, batch_size=12)
  stages = list(results["stages"].values())
  assert list(results["stages"]) == [
    "clean",
    "apgd-ce",
    "apgd-t",
    "fab-t",
    "square",
  ]
  assert stages == sorted(stages, reverse=True)
  assert stages[0] == results["natural"]["top1"]
  assert stages[-1] <= results["worst_case"]["top1"]
  assert stages[1] < stages[0]
  for name, attack in results["attacks"].items():
    assert results["stages"][name] <= attack["worst_case"]["top1"]
  assert set(results["attacks"]["apgd-ce"]["per_beta"]) == {
    "0",
    "inf",
    "inf/probe0",
    "inf/probe1",
  }
  # A cascade's Table 1 gives each attack's cumulative worst case (the
  # stages), not what each attack did to the examples it was given.
  markdown = evaluation.to_markdown(results)
  assert "## Table 1: top-1 of the final head (cascade)" in markdown
  assert (
    "| " + " | ".join(f"{top1:.2f}" for top1 in stages) + " | "
    f"{results['worst_case']['top1']:.2f} |"
  ) in markdown
  assert "Per beta_atk" not in markdown


def test_the_protocol_runs_the_ensembles_host_loops_with_each_target():
  """APGD-CE (Eq. 3 at each run's head weights) and FAB-T run through the
  ensemble's host-driven loops, and give what the traced attacks give."""
  _, fns = _model()
  # eps 0.02: some points stay robust through every APGD-CE run.
  apgd_ce, _, fab_t, _ = (
    _fewer_steps(attack)
    for attack in evaluation.protocols.autoattack_protocol(
      eps=0.02, **REDUCED
    ).attacks
  )
  protocol = evaluation.Protocol(
    "test", (apgd_ce, fab_t), ("stop",), (0.0, math.inf), cascade=True
  )
  calls = []

  def spy(loop):
    def record(*args):
      calls.append((loop.__name__, args[5:]))
      return loop(*args)

    return record

  spies = {attack: spy(loop) for attack, loop in HOST_LOOPS.items()}
  with mock.patch.dict(HOST_LOOPS, spies):
    driven = _evaluate(fns, protocol, batch_size=8)
  with mock.patch.dict(HOST_LOOPS, clear=True):
    traced = _evaluate(fns, protocol, batch_size=8)
  apgd_weights = [args[0] for name, args in calls if name == "apgd_host_loop"]
  targets = evaluation.protocols.adaptive_targets((0.0, math.inf), 2)
  assert (
    len(targets) == 4 and driven["cascade"]["runs"]["fab-t/0/stop"]["attacked"]
  )  # every run had points to attack
  assert sorted(tuple(np.asarray(w)) for w in apgd_weights) == sorted(
    tuple(np.asarray(attacks.head_weights(beta, probe, 2)))
    for beta, probe in targets
  )
  assert [name for name, _ in calls].count("fab_targeted_host_loop") == 1
  assert driven["stages"] == traced["stages"]
  assert driven["stages"]["apgd-ce"] < driven["stages"]["clean"]


def test_as_cascade_puts_table_1s_attacks_strongest_first():
  paper = evaluation.paper_protocol()
  cascade = evaluation.protocols.as_cascade(paper)
  assert cascade.cascade and not paper.cascade
  assert [a.name for a in cascade.attacks] == ["pgd100", "cw", "pgd20", "fgsm"]
  assert (cascade.betas, cascade.gradient_modes) == (
    paper.betas,
    paper.gradient_modes,
  )
  autoattack = evaluation.autoattack_protocol()
  assert evaluation.protocols.as_cascade(autoattack) is autoattack


@pytest.mark.slow
@pytest.mark.parametrize(
  "protocol", [_reduced_protocol(), _protocol(True)], ids=["autoattack", "pgd"]
)
def test_the_cascade_gives_the_full_protocols_worst_case(protocol, tmp_path):
  """The same final-head worst case, each run on fewer points; a resumed
  cascade reads its finished runs back. Table 1's attacks go strongest
  first (``as_cascade``); AutoAttack's keep their order, so their stages
  are the full protocol's."""
  _, fns = _model()
  full = _evaluate(
    fns, dataclasses.replace(protocol, cascade=False), batch_size=8
  )
  partial = evaluation.evaluator.PartialResults(tmp_path / "p.json", {})
  cascade_protocol = evaluation.protocols.as_cascade(protocol)
  cascaded = _evaluate(fns, cascade_protocol, batch_size=8, partial=partial)
  if protocol.cascade:
    assert cascaded["stages"] == full["stages"]
  assert list(cascaded["stages"]) == ["clean"] + [
    attack.name for attack in cascade_protocol.attacks
  ]
  assert cascaded["worst_case"]["top1"] == full["worst_case"]["top1"]
  assert list(cascaded["stages"].values())[-1] == full["worst_case"]["top1"]
  assert full["worst_case"]["top1"] < full["natural"]["top1"]
  runs = list(cascaded["cascade"]["runs"].values())
  attacked = [run["attacked"] for run in runs]
  assert attacked[0] == round(full["natural"]["top1"] * 23 / 100)
  assert attacked == sorted(attacked, reverse=True)
  assert attacked[-1] < attacked[0]
  for run, before in zip(runs[1:], runs):
    assert run["attacked"] == round(before["robust_accuracy"] * 23 / 100)
  resumed = _evaluate(fns, cascade_protocol, batch_size=8, partial=partial)
  assert resumed["stages"] == cascaded["stages"]
  # Read back, not rerun: each run keeps the time it took.
  assert resumed["cascade"] == cascaded["cascade"]
