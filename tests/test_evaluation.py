"""Tests of cifs_jax.evaluation against independently computed accuracies."""

import dataclasses
import functools
import json
import math
import signal
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import attacks
from cifs_jax import data
from cifs_jax.evaluation import evaluator
from cifs_jax.evaluation import metrics
from cifs_jax.evaluation import report
from cifs_jax.runs import evaluation as runner
from cifs_jax.evaluation import summary as summary_lib
from cifs_jax import evaluation
from tests.compilations import counted_compilations

IMAGE_SHAPE = (4, 4, 3)
NUM_CLASSES = 4
NUM_EXAMPLES = 23


def _mlp_with_probes(params, x, relevance_grad="stop"):
  """A two-layer MLP with two probes and a feature mask computed from probe 0.

  The mask sees the features through a stop-gradient ("stop") or not
  ("full"), so the two modes differ only in their gradients.
  """
  features = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
  seen = (
    features if relevance_grad == "full" else jax.lax.stop_gradient(features)
  )
  probe0 = features @ params["probe0"]
  mask = jax.nn.softmax((seen @ params["probe0"]) @ params["probe0"].T) * 8
  masked = features * mask
  return masked @ params["w2"], [probe0, masked @ params["probe1"]]


def _model(seed=0):
  """(params, {"stop": logits_fn, "full": logits_fn}) of a random model."""
  keys = jax.random.split(jax.random.key(seed), 4)
  dim = int(np.prod(IMAGE_SHAPE))
  params = {
    "w1": 3 * jax.random.normal(keys[0], (dim, 8)) / np.sqrt(dim),
    "w2": jax.random.normal(keys[1], (8, NUM_CLASSES)),
    "probe0": jax.random.normal(keys[2], (8, NUM_CLASSES)),
    "probe1": jax.random.normal(keys[3], (8, NUM_CLASSES)),
  }
  fns = {
    mode: jax.tree_util.Partial(
      functools.partial(_mlp_with_probes, relevance_grad=mode), params
    )
    for mode in evaluation.protocols.GRADIENT_MODES
  }
  return params, fns


def _dataset(seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (NUM_EXAMPLES,) + IMAGE_SHAPE, np.uint8)
  labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES)
  return images, labels


def _batches(images, labels, batch_size):
  """Fixed-size batches; the last one padded, with a validity mask."""
  for start in range(0, len(labels), batch_size):
    stop = min(start + batch_size, len(labels))
    padding = batch_size - (stop - start)
    pad = (
      lambda a: np.concatenate(  # noqa: E731
        [a[start:stop], np.zeros((padding,) + a.shape[1:], a.dtype)]
      )
    )
    yield data.Batch(pad(images), pad(labels), pad(np.ones(len(labels), bool)))


def _protocol(random_start, betas=(0.0, 1.0, math.inf)):
  pgd = attacks.PGDConfig(
    eps=0.1,
    step_size=0.03,
    num_steps=4,
    random_start=random_start,
    num_restarts=2 if random_start else 1,
  )
  return evaluation.Protocol(
    name="test",
    attacks=(
      evaluation.GradientAttack("fgsm", "FGSM", attacks.fgsm_config(0.1)),
      evaluation.GradientAttack(
        "pgd", "PGD", pgd, loss_kind="cw", confidence=1.0
      ),
    ),
    gradient_modes=("stop", "full"),
    betas=betas,
  )


def _evaluate(fns, protocol, batch_size, **kwargs):
  images, labels = _dataset()
  return evaluation.evaluate(
    fns,
    _batches(images, labels, batch_size),
    protocol,
    jax.random.key(0),
    progress=False,
    **kwargs,
  )


def _correct(logits, labels, k=1):
  """Whether each label is among the top-k logits (ties: lower index)."""
  order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")
  return np.any(order[:, :k] == labels[:, None], axis=-1)


def test_natural_top_k_and_per_class_match_numpy():
  _, fns = _model()
  results = _evaluate(fns, _protocol(False, betas=(0.0,)), batch_size=8)
  images, labels = _dataset()
  final, probes = fns["stop"](jnp.asarray(images, jnp.float32) / 255)
  natural = results["natural"]
  for k in (1, 2, 3):
    assert natural[f"top{k}"] == pytest.approx(
      100 * _correct(final, labels, k).mean()
    )
  assert natural["probes_top1"] == pytest.approx(
    [100 * _correct(p, labels).mean() for p in probes]
  )
  correct = _correct(final, labels)
  assert natural["per_class"] == pytest.approx(
    [100 * correct[labels == c].mean() for c in range(NUM_CLASSES)]
  )
  assert results["num_examples"] == NUM_EXAMPLES


def _independent_runs(fns, protocol, targets):
  """Each run of a protocol without random starts, attacked and scored here
  on ``_dataset()``: {(attack, target label, mode): (N, 1 + P) bool, whether
  the final head and each probe still predict the label}."""
  images, labels = _dataset()
  x, y = jnp.asarray(images, jnp.float32) / 255, jnp.asarray(labels)
  survived = {}
  for attack in protocol.attacks:
    for beta, probe in targets:
      for mode, fn in fns.items():
        loss = attacks.AttackLoss(
          kind=attack.loss_kind,
          beta=beta,
          probe=probe,
          confidence=attack.confidence,
        )
        final, probes = fn(attacks.pgd(fn, x, y, None, loss, attack.config))
        target = evaluation.protocols.beta_label(beta, probe)
        survived[attack.name, target, mode] = np.stack(
          [_correct(logits, labels) for logits in [final, *probes]], -1
        )
  return survived


def test_worst_case_is_the_per_example_and_of_independent_runs():
  _, fns = _model()
  protocol = _protocol(False)
  results = _evaluate(fns, protocol, batch_size=8)
  survived = _independent_runs(
    fns,
    protocol,
    [(0.0, None), (1.0, None), (math.inf, None), (math.inf, 0), (math.inf, 1)],
  )

  def accuracy(keys, head=0):
    return 100 * np.mean(np.all([survived[k][:, head] for k in keys], axis=0))

  everything = list(survived)
  for attack in protocol.attacks:
    summary = results["attacks"][attack.name]
    own = [k for k in everything if k[0] == attack.name]
    assert len(summary["runs"]) == len(own) == 10
    assert summary["worst_case"]["top1"] == pytest.approx(accuracy(own))
    assert summary["worst_case"]["top1"] <= min(
      run["top1"] for run in summary["runs"]
    )
    for target, value in summary["per_beta"].items():
      assert value == pytest.approx(
        accuracy([k for k in own if k[1] == target])
      )
    for mode, value in summary["per_gradient"].items():
      assert value == pytest.approx(accuracy([k for k in own if k[2] == mode]))
    table5 = summary["table5"]
    assert table5["final"]["final"] == summary["per_beta"]["0"]
    assert table5["adaptive"]["final"] == summary["worst_case"]["top1"]
    assert table5["probes"]["probe1"] == pytest.approx(
      accuracy([k for k in own if k[1] == "inf"], head=2)
    )
    assert table5["probe0"]["probe0"] == pytest.approx(
      accuracy([k for k in own if k[1] == "inf/probe0"], head=1)
    )
  assert results["worst_case"]["top1"] == pytest.approx(accuracy(everything))
  assert results["worst_case"]["top1"] < results["natural"]["top1"]


def test_results_do_not_depend_on_batch_size_or_device_count():
  _, fns = _model()
  protocol = _protocol(True, betas=(1.0,))
  protocol = dataclasses.replace(protocol, attacks=protocol.attacks[1:])
  reference = _evaluate(fns, protocol, batch_size=8)
  assert reference == _evaluate(fns, protocol, batch_size=5)
  assert reference == _evaluate(
    fns, protocol, batch_size=8, devices=jax.local_devices()[:1]
  )


def test_the_same_seed_gives_the_same_results_and_another_seed_differs():
  _, fns = _model()
  protocol = _protocol(True, betas=(0.0,))
  images, labels = _dataset()

  def run(seed):
    return evaluation.evaluate(
      fns,
      _batches(images, labels, 8),
      protocol,
      jax.random.key(seed),
      progress=False,
    )

  first = run(3)
  assert first == run(3)
  runs = lambda r: r["attacks"]["pgd"]["runs"]  # noqa: E731
  assert any(a != b for a, b in zip(runs(first), runs(run(4))))


def test_a_model_without_probes_has_one_target_per_attack():
  params, _ = _model()
  plain = jax.tree_util.Partial(
    lambda p, x: (_mlp_with_probes(p, x)[0], []), params
  )
  protocol = dataclasses.replace(_protocol(False), gradient_modes=("stop",))
  results = _evaluate({"stop": plain}, protocol, batch_size=8)
  assert results["num_probes"] == 0
  for summary in results["attacks"].values():
    assert [run["beta_atk"] for run in summary["runs"]] == ["0"]
    assert set(summary["table5"]) == {"final", "adaptive"}


def test_a_missing_gradient_mode_is_an_error():
  _, fns = _model()
  with pytest.raises(ValueError, match="full"):
    _evaluate({"stop": fns["stop"]}, _protocol(False), batch_size=8)


def test_paper_and_strong_protocols_follow_design_section_6():
  paper = evaluation.paper_protocol()
  strong = evaluation.strong_protocol()
  assert [a.label for a in paper.attacks] == [
    "FGSM",
    "PGD-20",
    "C&W-inf",
    "PGD-100",
  ]
  assert paper.gradient_modes == ("stop",)
  assert strong.gradient_modes == ("stop", "full")
  assert (
    paper.betas == strong.betas == (0.0, 0.1, 1.0, 2.0, 10.0, 100.0, math.inf)
  )
  eps = 8 / 255
  for attack in paper.attacks[1:]:
    assert attack.config.step_size == pytest.approx(0.1 * eps)
    assert not attack.config.random_start
  cw = paper.attacks[2]
  assert (cw.loss_kind, cw.confidence, cw.config.num_steps) == ("cw", 50, 30)
  for attack in strong.attacks[1:]:
    assert attack.config.step_size == pytest.approx(2 / 255)
    assert attack.config.random_start and attack.config.num_restarts > 1
  assert paper.attacks[0].config == attacks.fgsm_config(eps)


def test_publish_writes_json_markdown_and_a_console_table(tmp_path):
  _, fns = _model()
  results = _evaluate(
    fns, _protocol(False, betas=(0.0, math.inf)), batch_size=8
  )
  json_path, markdown_path = evaluation.publish(results, str(tmp_path), "paper")
  with open(json_path) as f:
    assert json.load(f) == results
  markdown = open(markdown_path).read()
  table1 = markdown.split("## Table 1")[1].split("##")[0]
  natural = f"{results['natural']['top1']:.2f}"
  fgsm = f"{results['attacks']['fgsm']['worst_case']['top1']:.2f}"
  assert f"| per-example worst case | {natural} | {fgsm} |" in table1
  fgsm_paper = f"{results['attacks']['fgsm']['min_over_beta']:.2f}"
  assert (
    f"| min over beta_atk (paper's comparator) | {natural} | {fgsm_paper} |"
    in table1
  )
  for title in (
    "Per beta_atk",
    "Per gradient mode",
    "Table 4",
    "Table 5",
    "Per class",
  ):
    assert f"## {title}" in markdown
  console = evaluation.console_summary(results)
  assert "Natural" in console and natural in console and "inf/probe1" in console


@pytest.mark.slow
def test_evaluates_a_cifs_resnet_in_both_gradient_modes():
  from cifs_jax import models  # pylint: disable=g-import-not-at-top

  config = models.default_config()
  config.name, config.width, config.num_classes = "resnet10", 4, NUM_CLASSES
  model = models.build_model(config)
  images, labels = _dataset()
  variables = model.init(
    jax.random.key(0), jnp.zeros((1,) + IMAGE_SHAPE), train=False
  )
  # At init the masked features are tiny and the head's bias decides every
  # prediction, so no attack changes one: scale the head to logits of std 3.
  head = variables["params"]["linear"]
  head["bias"] = jnp.zeros_like(head["bias"])
  clean_logits = model.apply(variables, jnp.asarray(images, jnp.float32) / 255)
  head["kernel"] *= 3 / np.std(clean_logits[0])
  fns = {
    mode: jax.tree_util.Partial(
      models.with_relevance_grad(model, mode).apply, variables
    )
    for mode in ("stop", "full")
  }
  protocol = dataclasses.replace(_protocol(False), betas=(2.0, math.inf))
  results = evaluation.evaluate(
    fns,
    _batches(images, labels, 8),
    protocol,
    jax.random.key(1),
    progress=False,
  )
  assert results["num_probes"] == 2
  pgd = results["attacks"]["pgd"]
  assert {run["gradient"] for run in pgd["runs"]} == {"stop", "full"}
  # Every run again, here; the per-example worst cases must agree.
  survived = _independent_runs(
    fns, protocol, [(2.0, None), (math.inf, None), (math.inf, 0), (math.inf, 1)]
  )
  for attack in protocol.attacks:
    summary = results["attacks"][attack.name]
    own = [key for key in survived if key[0] == attack.name]
    for mode in ("stop", "full"):
      robust = np.all([survived[k][:, 0] for k in own if k[2] == mode], 0)
      assert summary["per_gradient"][mode] == pytest.approx(100 * robust.mean())
    robust = np.all([survived[k][:, 0] for k in own], 0)
    assert summary["worst_case"]["top1"] == pytest.approx(100 * robust.mean())
    assert 0 < summary["worst_case"]["top1"] < results["natural"]["top1"]


def test_non_finite_logits_never_count_as_correct():
  """A NaN or infinite head is wrong at every k (not rank 0 = correct)."""
  final = jnp.array([[2.0, 1.0, 0.0], [jnp.nan, 0.0, 0.0], [jnp.inf, 0.0, 0.0]])
  probe = jnp.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
  ranks = metrics.true_class_ranks(final, [probe], jnp.array([0, 0, 0]))
  np.testing.assert_array_equal(ranks, [[0, 2], [3, 2], [3, 2]])


def test_min_over_beta_is_the_papers_comparator_not_the_worst_case():
  """Hand-made ranks: beta 0 fools examples 0 and 1, beta inf examples 2 and
  3 (of 5). Each separate attack leaves 60 % correct (the paper's "lowest
  accuracy over beta_atk"); per example, only example 4 survives both."""
  protocol = dataclasses.replace(
    _protocol(False, betas=(0.0, math.inf)),
    gradient_modes=("stop",),
  )
  protocol = dataclasses.replace(protocol, attacks=protocol.attacks[:1])
  runs = evaluation.protocol_runs(protocol, num_probes=1)
  assert [run.name for run in runs] == ["fgsm/0/stop", "fgsm/inf/stop"]
  fooled = {"fgsm/0/stop": [0, 1], "fgsm/inf/stop": [2, 3]}
  run_ranks = {}
  for name, examples in fooled.items():
    ranks = np.zeros((5, 2), np.int32)
    ranks[examples, 0] = 1
    run_ranks[name] = ranks
  results = summary_lib.summarize(
    protocol,
    runs,
    labels=np.zeros(5, np.int64),
    clean_ranks=np.zeros((5, 2), np.int32),
    run_ranks=run_ranks,
    num_classes=2,
  )
  fgsm = results["attacks"]["fgsm"]
  assert fgsm["per_beta"] == {"0": 60.0, "inf": 60.0}
  assert fgsm["min_over_beta"] == 60.0 == results["min_over_beta"]
  assert fgsm["worst_case"]["top1"] == 20.0 == results["worst_case"]["top1"]
  per_beta_table = report.tables(results)[2]  # after Table 1 and the stages
  assert per_beta_table[1][-1] == "min over beta_atk (paper's comparator)"
  assert per_beta_table[2] == [["FGSM", "60.00", "60.00", "20.00", "60.00"]]


class _InterruptAfter(evaluator.PartialResults):
  """Saves like PartialResults, then raises KeyboardInterrupt (as Ctrl-C
  would) once ``runs`` runs are saved; counts the runs it saved."""

  def __init__(self, path, runs):
    super().__init__(path, {"model": "test"})
    self.runs_left, self.saved = runs, []

  def save_run(self, name, ranks, seconds=None):
    super().save_run(name, ranks, seconds)
    self.saved.append(name)
    if len(self.saved) == self.runs_left:
      raise KeyboardInterrupt


def test_an_interrupted_evaluation_continues_with_the_same_numbers(tmp_path):
  _, fns = _model()
  protocol = _protocol(True, betas=(0.0, math.inf))
  reference = _evaluate(fns, protocol, batch_size=8)
  path = tmp_path / "eval.partial.json"
  with pytest.raises(KeyboardInterrupt):
    _evaluate(fns, protocol, batch_size=8, partial=_InterruptAfter(path, 3))
  saved = json.loads(path.read_text())
  assert len(saved["runs"]) == 3
  assert np.asarray(saved["runs"]["fgsm/0/stop"]).shape == (NUM_EXAMPLES, 3)

  rerun = _InterruptAfter(path, -1)  # Never interrupts.
  results = _evaluate(fns, protocol, batch_size=5, partial=rerun)
  assert results == reference
  all_runs = [run.name for run in evaluation.protocol_runs(protocol, 2)]
  assert rerun.saved == all_runs[3:]  # The finished runs were skipped.

  # Another evaluation (here another key) does not reuse them.
  other = _InterruptAfter(path, -1)
  images, labels = _dataset()
  evaluation.evaluate(
    fns,
    _batches(images, labels, 8),
    protocol,
    jax.random.key(1),
    progress=False,
    partial=other,
  )
  assert other.saved == all_runs


def test_one_compile_per_attack_and_gradient_mode():
  _, fns = _model(seed=5)  # New logits functions: compiled anew.
  protocol = _protocol(False, betas=(0.0, 1.0, math.inf))
  with counted_compilations() as compilations:
    _evaluate(fns, protocol, batch_size=8)
  # 2 attacks x 2 gradient modes, each over 5 targets and 3 batches.
  attack_programs = f"jit({evaluator._adversarial_ranks.__name__})"
  assert compilations.count(attack_programs) == 4


def test_report_header_labels_the_run(tmp_path):
  _, fns = _model()
  results = _evaluate(fns, _protocol(False, betas=(0.0,)), batch_size=8)
  results["run"] = {
    "dataset": "cifar10",
    "model": "resnet18",
    "width": None,
    "defense": "cifs",
    "train_method": "pgd_at",
    "eps": 8 / 255,
    "protocol": "test",
    "checkpoint": {
      "which": "best",
      "step": 1200,
      "epoch": 3,
      "metrics": {},
      "best_metric": "pgd_accuracy",
      "per_epoch_eval_examples": 1000,
    },
    "num_examples": NUM_EXAMPLES,
    "date": "2026-11-25T10:00:00+00:00",
    "device": "2 x cpu (cpu)",
    "jax_version": "0.10.2",
    "git_commit": "abc123",
  }
  markdown = report.to_markdown(results)
  header = markdown.split("## Table 1")[0]
  for text in (
    "cifar10, resnet18 (width None), defense cifs, trained with pgd_at;"
    " eps 0.0313725; protocol test; 23 examples.",
    "Checkpoint: best (step 1200, epoch 3); best = highest pgd_accuracy on"
    " the first 1000 test examples, measured every epoch.",
    "Date 2026-11-25T10:00:00+00:00; device 2 x cpu (cpu); jax 0.10.2;"
    " git commit abc123.",
  ):
    assert text in header
    assert text in report.console_summary(results)


def test_an_unwritable_output_fails_before_any_attack(tmp_path, monkeypatch):
  """``evaluate_and_publish`` checks the output first (root may write
  anywhere, so the directory is made impossible: below a file)."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  attacked = []
  monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: attacked.append(1))
  with pytest.raises(
    NotADirectoryError, match=f"{blocker}/out cannot be created: {blocker} is"
  ):
    runner.evaluate_and_publish(
      None, None, None, None, blocker / "out", protocol_name="paper"
    )
  assert not attacked


def test_build_protocol_restricts_and_adapts_to_the_model():
  build = runner.build_protocol
  paper = build("paper", 0.1, num_probes=2, has_cifs=True, unroll=3)
  assert [a.name for a in paper.attacks] == ["fgsm", "pgd20", "cw", "pgd100"]
  assert paper.betas == evaluation.protocols.PAPER_BETAS
  assert paper.gradient_modes == ("stop",)
  assert [a.config.eps for a in paper.attacks] == [0.1] * 4
  assert paper.attacks[1].config.step_size == pytest.approx(0.01)
  assert paper.attacks[1].config.unroll == 3
  # Restricted to the named attacks, in the order named.
  strong = build("strong", 0.1, 2, True, attack_names=("cw", "fgsm"))
  assert [a.name for a in strong.attacks] == ["cw", "fgsm"]
  assert strong.gradient_modes == ("stop", "full")
  assert strong.attacks[0].config.random_start
  # No CIFS mask: one gradient mode; no probes: the final head only.
  vanilla = build("strong", 0.1, num_probes=0, has_cifs=False)
  assert vanilla.gradient_modes == ("stop",)
  assert vanilla.betas == (0.0,)
  cas = build("strong", 0.1, num_probes=2, has_cifs=False)
  assert cas.gradient_modes == ("stop",)
  assert cas.betas == evaluation.protocols.PAPER_BETAS
  with pytest.raises(
    ValueError, match=r"protocol='weak' is not supported.*'paper', 'strong'"
  ):
    build("weak", 0.1, 2, True)
  with pytest.raises(
    ValueError,
    match=r"Unknown attack\(s\) \['pgd7'\]; the 'paper' protocol has "
    r"\['cw', 'fgsm', 'pgd100', 'pgd20'\]",
  ):
    build("paper", 0.1, 2, True, attack_names=("pgd20", "pgd7"))


def test_waiting_for_a_long_attack_batch_is_interruptible(monkeypatch):
  """A KeyboardInterrupt (Ctrl-C) reaches the evaluator while a batch is
  still computing, not once it is done. Ctrl-C comes at the first poll
  (from the main thread, so no other thread's scheduling decides when),
  with Python's own SIGINT handler (a background job inherits SIGINT
  ignored)."""

  @jax.jit
  def slow(x):
    return jax.lax.fori_loop(0, 3000, lambda i, v: jnp.tanh(v @ v), x)

  x = jnp.eye(256) * 0.5
  slow(x).block_until_ready()  # compile
  start = time.perf_counter()
  slow(x).block_until_ready()
  batch_seconds = time.perf_counter() - start

  def ctrl_c_then_sleep(seconds):
    signal.raise_signal(signal.SIGINT)
    time.sleep(seconds)

  # The evaluator module's clock only: no other code sleeps into Ctrl-C.
  monkeypatch.setattr(
    evaluator, "time", types.SimpleNamespace(sleep=ctrl_c_then_sleep)
  )
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
      evaluator._wait_interruptibly(slow(x))
    assert time.perf_counter() - start < batch_seconds / 2
  finally:
    signal.signal(signal.SIGINT, previous)
