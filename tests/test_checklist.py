"""Tests of the gradient-masking checklist: each check warns on a model built
to fail it, and a plain linear classifier passes them all.

The models are linear classifiers of 4 x 4 x 3 images from the class means of
synthetic data (no training loop), or that classifier with one defect: a
quantised input (zero gradients), a stop-gradient that hides the input
dependence (CIFS's "stop" mode done wrong), output noise, softmax outputs,
batch statistics.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax.evaluation import checklist, evaluator

IMAGE_SHAPE = (4, 4, 3)
NUM_CLASSES = 4
NUM_EXAMPLES = 64
EPS = 0.1
# Small attacks: the checks, not the attacks' strength, are under test.
SETTINGS = checklist.Settings(
  long_steps=40,
  num_restarts=2,
  eps_multipliers=(2.0,),
  noise_samples=10,
  square_queries=300,
)


def _dataset(seed):
  """uint8 images (N, 4, 4, 3) of 4 classes: class means in [0.25, 0.75]
  plus Gaussian noise; labels (N,)."""
  rng = np.random.default_rng(seed)
  means = rng.uniform(0.25, 0.75, (NUM_CLASSES,) + IMAGE_SHAPE)
  labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES)
  images = means[labels] + rng.normal(0, 0.1, (NUM_EXAMPLES,) + IMAGE_SHAPE)
  return np.round(255 * np.clip(images, 0, 1)).astype(np.uint8), labels, means


def _class_mean_classifier(means):
  """(weights (D, K), biases (K,)): the nearest class mean, as logits
  x . mu_k - |mu_k|^2 / 2 (times 4, so the softmax does not saturate)."""
  flat = means.reshape(NUM_CLASSES, -1)
  return {
    "w": 4 * jnp.asarray(flat.T, jnp.float32),
    "b": -2 * jnp.asarray(np.sum(flat**2, axis=1), jnp.float32),
  }


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _plain(params, x):
  return _linear(params, x), []


def _quantised(params, x, levels=8):
  """The linear classifier of x rounded to ``levels`` grey levels: the
  gradient is zero almost everywhere."""
  return _linear(params, jnp.round(x * levels) / levels), []


def _quantised_with_clean_probe(params, x):
  """Quantised final head, and a probe that is the unquantised classifier."""
  return _quantised(params, x)[0], [_linear(params, x)]


def _hidden_dependence(params, x, relevance_grad="stop"):
  """The linear classifier's values, but in "stop" mode its input gradient
  is that of an unrelated linear map (as a CIFS mask computed from stopped
  features would hide the input's effect)."""
  seen = x if relevance_grad == "full" else jax.lax.stop_gradient(x)
  decoy = _linear({"w": params["decoy"], "b": 0.0}, x)
  decoy_seen = _linear({"w": params["decoy"], "b": 0.0}, seen)
  return _linear(params, seen) + 1e-3 * (decoy - decoy_seen), []


def _noisy(params, x):
  """Logits plus fresh host noise at every call: a randomised model."""
  logits = _linear(params, x)
  noise = jax.pure_callback(
    lambda: np.random.default_rng()
    .normal(size=logits.shape)
    .astype(np.float32),
    jax.ShapeDtypeStruct(logits.shape, jnp.float32),
  )
  return logits + noise, []


def _probabilities(params, x):
  return jax.nn.softmax(_linear(params, x)), []


def _batch_centred(params, x):
  """The classifier of x minus the batch mean (BatchNorm in train mode)."""
  return _linear(params, x - jnp.mean(x, axis=0) + 0.5), []


def _fns(model, params, modes=("stop",)):
  return {
    mode: jax.tree_util.Partial(
      functools.partial(
        model, **({"relevance_grad": mode} if len(modes) > 1 else {})
      ),
      params,
    )
    for mode in modes
  }


@pytest.fixture(scope="module")
def data():
  images, labels, means = _dataset(seed=0)
  params = _class_mean_classifier(means)
  # A second classifier from an independent sample of the same classes.
  rng = np.random.default_rng(1)
  surrogate = _class_mean_classifier(means + rng.normal(0, 0.02, means.shape))
  return images, labels, params, surrogate


def _run(data, fns, surrogate=None, partial=None):
  images, labels, _, _ = data
  checks, results = checklist.run_checklist(
    fns,
    images,
    labels,
    EPS,
    jax.random.key(0),
    surrogate=surrogate,
    settings=SETTINGS,
    batch_size=32,
    partial=partial,
  )
  assert [c.number for c in checks] == list(range(1, 15))
  return {c.number: c for c in checks}, results


def _verdicts(checks):
  return {number: c.verdict for number, c in checks.items()}


@pytest.mark.slow
def test_a_plain_classifier_passes(data):
  """Every check passes or is not run (13 and 14: no mask, no probes)."""
  _, _, params, surrogate = data
  checks, results = _run(
    data,
    _fns(_plain, params),
    surrogate=jax.tree_util.Partial(_plain, surrogate),
  )
  expected = {n: checklist.PASS for n in range(1, 13)}
  expected.update({13: checklist.NOT_RUN, 14: checklist.NOT_RUN})
  assert _verdicts(checks) == expected, [
    c.explanation for c in checks.values() if c.verdict == checklist.WARN
  ]
  # The checks measure a non-trivial model: robust at eps, not at 0.5.
  assert 10 < checks[11].figures["white_box"] < results["natural"]["top1"]
  assert checks[9].figures["accuracy"] <= checks[9].figures["bound"]
  # The report: one row per check, and the attacks' tables, whose worst
  # case mixes the eps sweep's radii (said before them).
  markdown = checklist.to_markdown(list(checks.values()), results)
  assert "| 11 | the gradient-free Square" in markdown
  assert "not robust accuracies at the model's eps" in markdown
  assert markdown.index("eps sweep") < markdown.index("## Table 1")


@pytest.mark.slow
def test_quantised_input_is_flagged(data):
  """Zero gradients: Square (and noise, and a transfer from the
  unquantised classifier) beat PGD, and accuracy stays far above the
  grey-image bound at eps 0.5."""
  _, _, params, _ = data
  checks, _ = _run(
    data,
    _fns(_quantised, params),
    surrogate=jax.tree_util.Partial(_plain, params),
  )
  for number in (4, 9, 11, 12):
    assert checks[number].verdict == checklist.WARN, checks[number]
  assert checks[4].figures["stop"]["zero"] == 32  # Every example of batch 1.
  assert checks[11].figures["fooled_only_by_it"] > 5


@pytest.mark.slow
def test_masked_final_head_with_clean_probe_is_flagged(data):
  """Attacking the probe alone fools what attacking the final head cannot."""
  _, _, params, _ = data
  checks, _ = _run(data, _fns(_quantised_with_clean_probe, params))
  assert checks[14].verdict == checklist.WARN, checks[14]
  assert checks[14].figures["only_probes_fool"] > 5
  assert checks[13].verdict == checklist.NOT_RUN


@pytest.mark.slow
def test_stopped_gradient_that_hides_the_input_is_flagged(data):
  """The "stop" mode's gradient points nowhere useful: the full gradient
  finds what it misses; the worst case over both modes stays honest, so the
  other attack checks pass."""
  _, _, params, _ = data
  params = dict(
    params,
    decoy=jax.random.normal(jax.random.key(3), params["w"].shape),
  )
  checks, _ = _run(data, _fns(_hidden_dependence, params, ("stop", "full")))
  assert checks[13].verdict == checklist.WARN, checks[13]
  assert checks[13].figures["stop"] > checks[13].figures["full"] + 10
  assert checks[13].figures["only_stop_fools"] == 0
  assert checks[11].verdict == checklist.PASS, checks[11]


@pytest.mark.slow
def test_an_interrupted_checklist_continues_from_its_saved_runs(data, tmp_path):
  """Every finished attack run is saved. A rerun reads the saved runs back
  (a noise run edited in the file to fool every example makes check 10
  warn) and runs the missing ones again, to the same checks."""
  _, _, params, _ = data
  path = tmp_path / "eval_checklist_last.partial.json"
  fns = _fns(_plain, params)
  first, _ = _run(data, fns, partial=evaluator.PartialResults(path, {}))
  saved = json.loads(path.read_text())
  names = set(saved["runs"])
  assert {"long/0/stop", "noise/0/stop"} <= names, names
  del saved["runs"]["long/0/stop"]  # interrupted during PGD-100
  noise = np.asarray(saved["runs"]["noise/0/stop"])
  noise[:, 0] = np.maximum(noise[:, 0], 1)  # every example fooled
  saved["runs"]["noise/0/stop"] = noise.tolist()
  path.write_text(json.dumps(saved))

  second, _ = _run(data, fns, partial=evaluator.PartialResults(path, {}))
  assert first[10].verdict == checklist.PASS
  assert second[10].verdict == checklist.WARN, second[10]
  assert {n: c for n, c in second.items() if n != 10} == {
    n: c for n, c in first.items() if n != 10
  }
  assert set(json.loads(path.read_text())["runs"]) == names


@pytest.mark.parametrize(
  "model, number",
  [(_noisy, 1), (_probabilities, 2), (_batch_centred, 3)],
  ids=["randomised", "probabilities", "batch-dependent"],
)
def test_model_defects_are_flagged(data, model, number):
  """Checks 1-3 warn on the model with that defect (a randomised model's
  outputs also differ between batches: check 3), and the plain classifier
  passes them."""
  images, labels, params, _ = data
  x = jnp.asarray(images[:32], jnp.float32) / 255
  defect = checklist.model_checks(_fns(model, params), x, labels[:32])
  plain = checklist.model_checks(_fns(_plain, params), x, labels[:32])
  assert [c.verdict for c in plain] == [checklist.PASS] * 4
  warned = [c.number for c in defect if c.verdict == checklist.WARN]
  assert warned == ([1, 3] if model is _noisy else [number])


def test_settings_reject_a_large_eps_below_the_grey_bound():
  with pytest.raises(ValueError, match="large_eps"):
    checklist.Settings(large_eps=0.4)


def test_sweep_is_increasing_and_ends_at_large_eps():
  settings = checklist.Settings(eps_multipliers=(0.5, 2.0, 100.0))
  assert settings.sweep(0.1) == (0.05, 0.1, 0.2, 0.5)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--protocol=checklist", "--attacks=fgsm"], "--attacks does not apply"),
    (["--protocol=paper", "--surrogate=/nonexistent"], "--surrogate applies"),
  ],
  ids=["attacks", "surrogate"],
)
def test_evaluate_command_rejects_flags_that_do_not_apply(
  tmp_path, flags, message
):
  """Before reading the workdir, the command names the flag at fault."""
  result = subprocess.run(
    [sys.executable, "-m", "cifs_jax.evaluate", f"--workdir={tmp_path}"]
    + flags,
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert message in result.stderr + result.stdout
