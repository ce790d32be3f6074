"""A gradient-masking checklist: the checks a tool can run by itself.

  python -m cifs_jax.evaluate --workdir=DIR --protocol=checklist \
      [--surrogate=VANILLA_RUN_DIR] [--num_examples=N]

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", §5) and Athalye
et al. 2018 ("Obfuscated Gradients Give a False Sense of Security") list the
symptoms of an evaluation that overstates robustness; AutoAttack's
``checks.py`` (Croce & Hein 2020) runs a few of them. ``run_checklist`` runs
those that need nothing but the model and the data, each a numbered check
with a verdict: "pass", "warn" (the symptom is there; the explanation says
what to do) or "not run" (and why):

Of the model, on one batch (no attack):
   1. the outputs are deterministic (else attack with EOT);
   2. the outputs are logits, not probabilities;
   3. an example's outputs do not depend on the rest of its batch;
   4. the input gradient of the cross-entropy is finite and non-zero, in
      each gradient mode.
Of the attacks, at the model's eps (accuracies of the final head; PGD on
the cross-entropy, C&W-inf on the margin):
   5. PGD-20 is at least as strong as FGSM;
   6. more steps (PGD-100) and restarts (PGD-20 x R) never raise accuracy;
   7. PGD-20 has converged: the per-example worst case of PGD-20, PGD-100
      and the restarts is within the tolerance of PGD-20 alone;
   8. accuracy never rises with eps (PGD-20 over an eps sweep);
   9. at eps = 0.5 accuracy falls to the bound every classifier obeys: the
      mid-grey image 0.5 is within 0.5 of every input, so at most the
      examples of the class the model gives it can be robust;
  10. uniform noise in the eps-ball fools no example that every white-box
      attack leaves robust;
  11. nor does the gradient-free Square attack;
  12. nor does PGD transferred from a surrogate (a model trained the same
      way without the defence; not run without one);
  13. (CIFS) the gradient through the mask ("full") and the authors' stopped
      gradient ("stop", docs/design.md §2) each find the adversarial
      examples the other finds;
  14. (probes) attacking the probes (all, and each alone, beta_atk = inf)
      fools no example that attacking the final head leaves robust.

"White-box" means every gradient attack at eps, every gradient mode and
beta_atk target. Comparisons allow ``Settings.tolerance`` percentage points,
and never less than one example. The attacks run as one evaluator protocol
(``checklist_protocol``): compiled once per (attack, gradient mode), batched
and sharded like every protocol; the checks read the per-example ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cifs_jax import attacks, data, losses
from cifs_jax.attacks import LogitsFn
from cifs_jax.evaluation import evaluator, metrics, protocols, report

Array = jax.Array

NAME = "checklist"
PASS, WARN, NOT_RUN = "pass", "warn", "not run"

CARLINI = "Carlini et al. 2019 §5"
ATHALYE = "Athalye et al. 2018"
AUTOATTACK = "AutoAttack checks.py"
# Relative change of L2-normalised outputs above which two evaluations of the
# same inputs differ (AutoAttack's check_randomized uses 1e-4).
OUTPUT_TOLERANCE = 1e-4
# The L-inf radius from which the constant image 0.5 is in every eps-ball.
GREY_EPS = 0.5


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """One check's outcome.

  Attributes:
    number: its number in the list of the module docstring.
    name: what it checks.
    reference: where the check comes from.
    verdict: ``PASS``, ``WARN`` or ``NOT_RUN``.
    explanation: what was measured and, for a warning, what it means.
    figures: the measurements: accuracies in %, counts of examples.
  """

  number: int
  name: str
  reference: str
  verdict: str
  explanation: str
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The checklist's attacks (eps-relative sizes) and tolerance.

  Attributes:
    short_steps, long_steps: PGD steps of the short and the long attack.
    num_restarts: restarts of the restarted short attack.
    eps_multipliers: the eps sweep, as multiples of the model's eps (with
      eps itself and ``large_eps``; those above ``large_eps`` are dropped).
    large_eps: the sweep's largest eps, >= 0.5 (check 9's bound).
    noise_samples: uniform draws in the eps-ball (check 10).
    square_queries: Square's query budget (check 11).
    tolerance: allowed difference, in percentage points.
    unroll: ``PGDConfig.unroll`` (0: per backend).
  """

  short_steps: int = 20
  long_steps: int = 100
  num_restarts: int = 5
  eps_multipliers: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0)
  large_eps: float = GREY_EPS
  noise_samples: int = 20
  square_queries: int = 1000
  tolerance: float = 1.0
  unroll: int = 0

  def __post_init__(self):
    if self.large_eps < GREY_EPS:
      raise ValueError(
        f"large_eps must be >= {GREY_EPS} (check 9's bound), got "
        f"{self.large_eps}."
      )
    if self.num_restarts < 2:
      raise ValueError(f"num_restarts must be >= 2, got {self.num_restarts}.")

  def sweep(self, eps: float) -> tuple[float, ...]:
    """The eps of check 8, increasing: eps, its multiples, ``large_eps``."""
    radii = {eps * m for m in self.eps_multipliers} | {eps, self.large_eps}
    return tuple(sorted(r for r in radii if 0 < r <= self.large_eps))


DEFAULT_SETTINGS = Settings()


# ---------------------------------------------------------------- attacks


@dataclasses.dataclass(frozen=True)
class FinalHeadAttack(protocols.GradientAttack):
  """A ``GradientAttack`` on the final head only (no beta_atk targets)."""

  adaptive = False


@dataclasses.dataclass(frozen=True)
class RandomNoise(protocols.GradientAttack):
  """Uniform draws in the eps-ball: ``pgd`` with random starts as restarts
  and steps of length 0 (the first draw that fools the final head is
  kept, else the one of highest loss); no gradient is followed."""

  adaptive = False
  gradient_based = False


@dataclasses.dataclass(frozen=True)
class TransferAttack(protocols.GradientAttack):
  """``GradientAttack`` crafted on the final head of ``surrogate`` (a
  ``LogitsFn``), then shown to the attacked model."""

  surrogate: Callable | None = None
  adaptive = False
  gradient_based = False

  def __call__(self, logits_fn, x, y, keys, head_weights):
    def surrogate_final_head(inputs):
      return self.surrogate(inputs)[0], []

    return super().__call__(
      surrogate_final_head, x, y, keys, np.ones(1, np.float32)
    )

  def settings(self) -> dict[str, Any]:
    return {**super().settings(), "crafted_on": "surrogate"}


def checklist_protocol(
  eps: float,
  gradient_modes: Sequence[str],
  settings: Settings = DEFAULT_SETTINGS,
  surrogate: LogitsFn | None = None,
) -> protocols.Protocol:
  """The attacks of checks 5-14 as one protocol (betas 0 and inf: the
  short PGD runs at every target, the others on the final head)."""

  def pgd(num_steps, radius=eps, restarts=1):
    return attacks.PGDConfig(
      eps=radius,
      step_size=radius / 4,
      num_steps=num_steps,
      random_start=True,
      num_restarts=restarts,
      unroll=settings.unroll,
    )

  short, long = settings.short_steps, settings.long_steps
  at_eps = [
    FinalHeadAttack("fgsm", "FGSM", attacks.fgsm_config(eps)),
    protocols.GradientAttack("short", f"PGD-{short}", pgd(short)),
    FinalHeadAttack("cw", f"C&W-inf {short}", pgd(short), loss_kind="cw"),
    FinalHeadAttack("long", f"PGD-{long}", pgd(long)),
    FinalHeadAttack(
      "restarts",
      f"PGD-{short} x {settings.num_restarts}",
      pgd(short, restarts=settings.num_restarts),
    ),
    RandomNoise(
      "noise",
      f"noise x {settings.noise_samples}",
      dataclasses.replace(
        pgd(1, restarts=settings.noise_samples), step_size=0.0
      ),
    ),
    protocols.ComponentAttack(
      "square",
      "Square",
      attacks.square,
      # A budget of its own: the window schedule stretched to it (the
      # official SquareAttack's default), and windows anywhere in the image
      # (the official placement never changes the last row and column of
      # a small image but with a window spanning it).
      attacks.SquareConfig(
        eps=eps,
        num_queries=settings.square_queries,
        rescale_schedule=True,
        window_anywhere=True,
      ),
    ),
  ]
  if surrogate is not None:
    at_eps.append(
      TransferAttack(
        "transfer", f"PGD-{long} transfer", pgd(long), surrogate=surrogate
      )
    )
  sweep = [
    FinalHeadAttack(
      _sweep_name(radius), f"PGD-{short} eps {radius:.4g}", pgd(short, radius)
    )
    for radius in settings.sweep(eps)
    if radius != eps
  ]
  return protocols.Protocol(
    name=NAME,
    attacks=tuple(at_eps + sweep),
    gradient_modes=tuple(gradient_modes),
    betas=(0.0, math.inf),
  )


def _sweep_name(radius: float) -> str:
  return f"short@{radius:.6g}"


# ---------------------------------------------------------------- checks


def model_checks(
  logits_fns: Mapping[str, LogitsFn], x: Array, y: Array
) -> list[CheckResult]:
  """Checks 1-4 on float inputs ``x`` (N, ...) in [0, 1], labels y (N,)."""
  modes = _modes(logits_fns)
  forward = jax.jit(logits_fns[modes[0]])
  first, *repeats = [np.asarray(forward(x)[0]) for _ in range(3)]
  changed = max(_relative_change(first, again) for again in repeats)
  results = [
    _verdict(
      1,
      "deterministic outputs",
      f"{AUTOATTACK} check_randomized; {ATHALYE} (EOT)",
      changed > OUTPUT_TOLERANCE,
      f"Three evaluations of the same {len(y)} inputs differ by up to "
      f"{changed:.3g} (relative, L2-normalised logits).",
      "A randomised model: attack the expectation over its randomness "
      "(EOT) and ensemble its predictions.",
      {"relative_change": changed},
    )
  ]
  sums = first.sum(axis=-1)
  probabilities = bool(
    first.min() >= -1e-5
    and first.max() <= 1 + 1e-5
    and np.allclose(sums, 1, atol=1e-5)
  )
  results.append(
    _verdict(
      2,
      "outputs are logits, not probabilities",
      f"{AUTOATTACK} check_range_output",
      probabilities,
      f"Final-head outputs in [{first.min():.3g}, {first.max():.3g}],"
      f" row sums in [{sums.min():.3g}, {sums.max():.3g}].",
      "The outputs look like probabilities: the cross-entropy of a softmax "
      "of them saturates; give the attacks the logits.",
    )
  )
  half = max(len(y) // 2, 1)
  alone = np.asarray(jax.jit(logits_fns[modes[0]])(x[:half])[0])
  batch_change = _relative_change(first[:half], alone)
  results.append(
    _verdict(
      3,
      "outputs do not depend on the rest of the batch",
      f"beyond {AUTOATTACK} (cf. check_dynamic)",
      batch_change > OUTPUT_TOLERANCE,
      f"The first {half} examples' logits, alone and in a batch of "
      f"{len(y)}, differ by up to {batch_change:.3g} (relative).",
      "The prediction depends on the batch (e.g. BatchNorm in training "
      "mode): attacks and accuracies depend on the batch size.",
      {"relative_change": batch_change},
    )
  )
  flat = {}
  for mode in modes:
    gradient = np.asarray(_input_gradient(logits_fns[mode], x, y))
    gradient = gradient.reshape(len(y), -1)
    flat[mode] = {
      "zero": int(np.sum(np.all(gradient == 0, axis=1))),
      "non_finite": int(np.sum(~np.all(np.isfinite(gradient), axis=1))),
    }
  bad = {m: c for m, c in flat.items() if c["zero"] or c["non_finite"]}
  results.append(
    _verdict(
      4,
      "input gradients are finite and non-zero",
      f"{AUTOATTACK} check_zero_gradients; {ATHALYE} (shattered gradients)",
      bool(bad),
      "Examples (of "
      f"{len(y)}) whose cross-entropy gradient is zero / not finite: "
      + ", ".join(
        f"{m} {c['zero']} / {c['non_finite']}" for m, c in flat.items()
      )
      + ".",
      "Gradient attacks cannot move these points: the gradient is masked "
      "(saturated softmax, quantisation, a stop-gradient); trust the "
      "gradient-free and transfer checks.",
      flat,
    )
  )
  return results


@jax.jit
def _input_gradient(logits_fn, x, y):
  """d/dx of the summed cross-entropy of the final head: shaped like x."""

  def loss(inputs):
    return jnp.sum(losses.cross_entropy_per_example(logits_fn(inputs)[0], y))

  return jax.grad(loss)(x)


def _relative_change(a: np.ndarray, b: np.ndarray) -> float:
  """Largest per-row L2 distance of the L2-normalised rows of a and b."""

  def normalise(rows):
    rows = rows.astype(np.float64)
    return rows / (np.linalg.norm(rows, axis=-1, keepdims=True) + 1e-10)

  difference = np.linalg.norm(normalise(a) - normalise(b), axis=-1)
  return float(np.nan_to_num(difference, nan=np.inf).max())


def _verdict(number, name, reference, warn, measured, advice, figures=None):
  return CheckResult(
    number=number,
    name=name,
    reference=reference,
    verdict=WARN if warn else PASS,
    explanation=f"{measured} {advice}" if warn else measured,
    figures=dict(figures or {}),
  )


class _RankRecorder:
  """An ``evaluator.RunStore`` that keeps each finished run's ranks in
  memory for the checks, and in ``saved`` (a ``PartialResults`` file, for a
  rerun to continue from), if given."""

  def __init__(self, saved: evaluator.RunStore | None = None):
    self.saved = saved
    self.ranks: dict[str, np.ndarray] = {}

  def start(self, fingerprint):
    self.ranks = dict(self.saved.start(fingerprint)) if self.saved else {}
    return dict(self.ranks)

  def seconds(self, name):
    return self.saved.seconds(name) if self.saved else None

  def save_run(self, name, ranks, seconds=None):
    self.ranks[name] = np.asarray(ranks)
    if self.saved:
      self.saved.save_run(name, ranks, seconds)


def _modes(logits_fns: Mapping[str, LogitsFn]) -> tuple[str, ...]:
  modes = tuple(m for m in protocols.GRADIENT_MODES if m in logits_fns)
  if not modes:
    raise ValueError(
      f"logits_fns needs a key of {protocols.GRADIENT_MODES}, got "
      f"{sorted(logits_fns)}."
    )
  return modes


def run_checklist(
  logits_fns: Mapping[str, LogitsFn],
  images: np.ndarray,
  labels: np.ndarray,
  eps: float,
  key: Array,
  *,
  surrogate: LogitsFn | None = None,
  settings: Settings = DEFAULT_SETTINGS,
  batch_size: int = 128,
  progress: bool = False,
  partial: evaluator.PartialResults | None = None,
) -> tuple[list[CheckResult], dict]:
  """Runs checks 1-14 (module docstring) on a model.

  Args:
    logits_fns: gradient mode -> ``logits_fn``: {"stop": ...} for a model
      without an input-dependent mask, {"stop": ..., "full": ...} for CIFS
      (as ``runs.evaluation.logits_functions``; pass
      ``jax.tree_util.Partial``s).
    images: uint8 (N, H, W, C) test images; labels: int (N,).
    eps: the L-inf radius of the threat model (input units).
    key: PRNG key of the random starts and queries.
    surrogate: ``logits_fn`` of a model trained the same way without the
      defence (check 12), or None (check 12 is not run).
    settings: the attacks' sizes and the tolerance.
    batch_size: examples per attack batch (and of checks 1-4).
    progress: show the evaluator's progress bar.
    partial: where the finished attack runs are saved and found again by a
      rerun (``evaluator.PartialResults``); None: nothing is saved.

  Returns:
    (the 14 check results in order, the evaluator's results dict of the
    attacks, whose accuracies are in %).
  """
  modes = _modes(logits_fns)
  labels = np.asarray(labels)
  first = slice(0, min(batch_size, len(labels)))
  checks = model_checks(
    logits_fns, data.to_float(jnp.asarray(images[first])), labels[first]
  )
  num_classes = int(
    jax.eval_shape(
      logits_fns[modes[0]],
      jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32),
    )[0].shape[-1]
  )
  protocol = checklist_protocol(eps, modes, settings, surrogate)
  recorder = _RankRecorder(partial)
  results = evaluator.evaluate(
    logits_fns,
    data.eval_batches(data.Split(images, labels, num_classes), batch_size),
    protocol,
    key,
    progress=progress,
    partial=recorder,
  )
  robust = _Robustness(
    evaluator.protocol_runs(protocol, results["num_probes"]),
    recorder.ranks,
    tolerance=max(settings.tolerance, 100.0 / len(labels)),
  )
  grey = logits_fns[modes[0]](jnp.full((1,) + images.shape[1:], GREY_EPS))
  grey_class = int(jnp.argmax(grey[0][0]))
  checks += _attack_checks(
    robust, protocol, settings, eps, modes, results, labels, grey_class
  )
  return checks, results


class _Robustness:
  """Per-example robustness of the final head under sets of runs."""

  def __init__(self, runs, ranks, tolerance):
    self.runs = runs
    self.ranks = ranks
    self.tolerance = tolerance

  def robust(self, *names: str, where=lambda run: True) -> np.ndarray:
    """bool (N,): the final head is right after every selected run."""
    selected = [
      self.ranks[run.name][:, 0]
      for run in self.runs
      if run.attack.name in names and where(run)
    ]
    return metrics.worst_case(selected) == 0

  def accuracy(self, *names: str, where=lambda run: True) -> float:
    return metrics.top_k_accuracy(
      np.where(self.robust(*names, where=where), 0, 1)
    )


def _percent(mask: np.ndarray) -> float:
  return 100.0 * float(np.mean(mask))


def _stronger_check(
  number, name, reference, robust: _Robustness, white_box, other, label, advice
):
  """``other`` (bool (N,) robust) fools no more than the tolerance of the
  examples ``white_box`` (bool (N,)) leaves robust."""
  only_other = white_box & ~other
  share = _percent(only_other)
  return _verdict(
    number,
    name,
    reference,
    share > robust.tolerance,
    f"{label} fooled {int(only_other.sum())} of {len(other)} examples "
    f"({share:.2f}%) that every white-box attack left robust (tolerance "
    f"{robust.tolerance:.2f}%); white-box {_percent(white_box):.2f}%, "
    f"{label} {_percent(other):.2f}%.",
    advice,
    {
      "white_box": _percent(white_box),
      label: _percent(other),
      "fooled_only_by_it": share,
    },
  )


def _attack_checks(
  robust: _Robustness,
  protocol: protocols.Protocol,
  settings: Settings,
  eps: float,
  modes: Sequence[str],
  results: dict,
  labels: np.ndarray,
  grey_class: int,
) -> list[CheckResult]:
  """Checks 5-14 from the per-example ranks of the checklist's runs."""
  tolerance = robust.tolerance
  labels_of = {a.name: a.label for a in protocol.attacks}
  final_head = lambda run: run.beta == 0  # noqa: E731
  accuracy = {
    name: robust.accuracy(name, where=final_head)
    for name in ("fgsm", "short", "long", "restarts")
  }
  short, long, restarts = (
    labels_of["short"],
    labels_of["long"],
    labels_of["restarts"],
  )
  checks = [
    _verdict(
      5,
      "iterative attacks beat single-step ones",
      CARLINI,
      accuracy["fgsm"] < accuracy["short"] - tolerance,
      f"FGSM {accuracy['fgsm']:.2f}%, {short} {accuracy['short']:.2f}% "
      f"(tolerance {tolerance:.2f}).",
      "FGSM is stronger: the iterative attack is stuck (masked or noisy "
      "gradients, too small a step).",
      {"FGSM": accuracy["fgsm"], short: accuracy["short"]},
    )
  ]
  raised = {
    label: accuracy[name] - accuracy["short"]
    for name, label in (("long", long), ("restarts", restarts))
  }
  checks.append(
    _verdict(
      6,
      "more steps and restarts never raise accuracy",
      CARLINI,
      max(raised.values()) > tolerance,
      f"{short} {accuracy['short']:.2f}%, {long} {accuracy['long']:.2f}%, "
      f"{restarts} {accuracy['restarts']:.2f}% (tolerance "
      f"{tolerance:.2f}).",
      "A stronger attack does worse: the loss surface misleads the "
      "attack (randomness, obfuscated gradients).",
      {
        short: accuracy["short"],
        long: accuracy["long"],
        restarts: accuracy["restarts"],
      },
    )
  )
  strongest = robust.accuracy("short", "long", "restarts", where=final_head)
  checks.append(
    _verdict(
      7,
      f"{short} has converged",
      CARLINI,
      accuracy["short"] - strongest > tolerance,
      f"{short} {accuracy['short']:.2f}%; per example the worst case of "
      f"{short}, {long} and {restarts} {strongest:.2f}% (tolerance "
      f"{tolerance:.2f}).",
      f"{short} overstates robustness: report more steps and restarts.",
      {short: accuracy["short"], "worst_case": strongest},
    )
  )
  sweep = {
    radius: robust.accuracy(
      "short" if radius == eps else _sweep_name(radius), where=final_head
    )
    for radius in settings.sweep(eps)
  }
  radii = list(sweep)
  rises = [
    (small, large)
    for small, large in zip(radii, radii[1:])
    if sweep[large] > sweep[small] + tolerance
  ]
  curve = ", ".join(f"eps {r:.4g}: {a:.2f}%" for r, a in sweep.items())
  figures = {f"{r:.6g}": a for r, a in sweep.items()}
  checks.append(
    _verdict(
      8,
      "accuracy never rises with eps",
      CARLINI,
      bool(rises),
      f"{short}: {curve}.",
      "Accuracy rises with the budget: the attack fails at large eps "
      "(masked gradients or too few steps).",
      figures,
    )
  )
  bound = 100.0 * float(np.mean(labels == grey_class))
  large = sweep[radii[-1]]
  checks.append(
    _verdict(
      9,
      f"at eps {radii[-1]:.4g} accuracy falls to the grey-image bound",
      f"{CARLINI} (large distortion)",
      large > bound + tolerance,
      f"{short} at eps {radii[-1]:.4g}: {large:.2f}%. The grey image 0.5 is "
      f"within {GREY_EPS} of every input and the model calls it class "
      f"{grey_class}, so at most {bound:.2f}% (that class's share) can be "
      f"robust (tolerance {tolerance:.2f}).",
      "The attack misses adversarial examples that exist: gradient masking.",
      {"accuracy": large, "bound": bound},
    )
  )
  white_box = robust.robust(*_white_box(protocol, eps))
  checks.append(
    _stronger_check(
      10,
      "random noise is weaker than white-box attacks",
      f"{CARLINI} (brute-force random search)",
      robust,
      white_box,
      robust.robust("noise"),
      labels_of["noise"],
      "Random points beat the gradient: the gradients are masked.",
    )
  )
  checks.append(
    _stronger_check(
      11,
      "the gradient-free Square is weaker than white-box attacks",
      f"{CARLINI} (gradient-free attacks); {AUTOATTACK} check_square_sr",
      robust,
      white_box,
      robust.robust("square"),
      "Square",
      "A score-based attack beats the gradient: the gradients are masked; "
      "report the worst case including Square.",
    )
  )
  if "transfer" in labels_of:
    checks.append(
      _stronger_check(
        12,
        "transfer from a surrogate is weaker than white-box attacks",
        f"{CARLINI} (transferability); {ATHALYE}",
        robust,
        white_box,
        robust.robust("transfer"),
        labels_of["transfer"],
        "A surrogate's gradient beats the model's own: the model's "
        "gradients are masked.",
      )
    )
  else:
    checks.append(
      CheckResult(
        12,
        "transfer from a surrogate is weaker than white-box attacks",
        f"{CARLINI} (transferability); {ATHALYE}",
        NOT_RUN,
        "No surrogate given (--surrogate=DIR: a model trained the same way "
        "without the defence).",
      )
    )
  checks.append(_gradient_mode_check(robust, protocol, eps, modes))
  checks.append(_probe_check(robust, results["num_probes"], short))
  return checks


def _gradient_mode_check(robust, protocol, eps, modes) -> CheckResult:
  """Check 13: each gradient mode finds what the other finds."""
  name = "the full and the stopped gradient find the same examples"
  reference = f"{ATHALYE} (backward approximations); docs/design.md §2"
  if len(modes) < 2:
    return CheckResult(
      13,
      name,
      reference,
      NOT_RUN,
      "One gradient mode: the model has no input-dependent mask.",
    )
  per_mode = {
    mode: robust.robust(
      *_white_box(protocol, eps), where=lambda run, m=mode: run.gradient == m
    )
    for mode in modes
  }
  missed = {
    mode: _percent(per_mode[mode] & ~per_mode[other])
    for mode, other in (("stop", "full"), ("full", "stop"))
  }
  measured = (
    f"White-box accuracy with the stopped gradient "
    f"{_percent(per_mode['stop']):.2f}%, the full gradient "
    f"{_percent(per_mode['full']):.2f}%; examples only the full gradient "
    f"fools {missed['stop']:.2f}%, only the stopped one "
    f"{missed['full']:.2f}% (tolerance {robust.tolerance:.2f})."
  )
  advice = (
    "One gradient mode alone overstates robustness (the authors' "
    "stopped gradient if the full one finds more): report the worst case "
    "over both."
  )
  return _verdict(
    13,
    name,
    reference,
    max(missed.values()) > robust.tolerance,
    measured,
    advice,
    {
      "stop": _percent(per_mode["stop"]),
      "full": _percent(per_mode["full"]),
      "only_full_fools": missed["stop"],
      "only_stop_fools": missed["full"],
    },
  )


def _probe_check(robust, num_probes, short) -> CheckResult:
  """Check 14: attacks on the probes add nothing to the final head's."""
  name = "attacking the probes adds nothing to attacking the final head"
  reference = "CIFS adaptive attack (beta_atk = inf, each probe alone)"
  if num_probes == 0:
    return CheckResult(14, name, reference, NOT_RUN, "The model has no probes.")
  final = robust.robust("short", where=lambda run: run.beta == 0)
  probes = robust.robust("short", where=lambda run: math.isinf(run.beta))
  only = final & ~probes
  per_target = {
    protocols.beta_label(run.beta, run.probe): robust.accuracy(
      "short",
      where=lambda r, run=run: (r.beta, r.probe) == (run.beta, run.probe),
    )
    for run in robust.runs
    if run.attack.name == "short"
  }
  return _verdict(
    14,
    name,
    reference,
    _percent(only) > robust.tolerance,
    f"{short} accuracy of the final head per target: "
    + ", ".join(f"{t}: {a:.2f}%" for t, a in per_target.items())
    + f"; examples only a probe attack fools {_percent(only):.2f}% "
    f"(tolerance {robust.tolerance:.2f}).",
    "The final head's gradient is weaker than a probe's: report the "
    "adaptive worst case over beta_atk and probes.",
    {**per_target, "only_probes_fool": _percent(only)},
  )


def _white_box(protocol: protocols.Protocol, eps: float) -> list[str]:
  """Names of the protocol's gradient attacks at radius ``eps``."""
  return [
    a.name for a in protocol.attacks if a.gradient_based and a.config.eps == eps
  ]


# ---------------------------------------------------------------- reports


def to_markdown(checks: Sequence[CheckResult], results: dict) -> str:
  """The checklist as a Markdown table, then the attacks' tables."""
  counts = {
    verdict: sum(c.verdict == verdict for c in checks)
    for verdict in (PASS, WARN, NOT_RUN)
  }
  lines = [
    "# Gradient-masking checklist",
    "",
    *report.run_lines(results.get("run")),
    f"{results['num_examples']} examples; "
    + ", ".join(f"{n} {v}" for v, n in counts.items())
    + ". Accuracies in %.",
    "",
    "| # | check | verdict | measured | source |",
    "| --- | --- | --- | --- | --- |",
  ]
  lines += [
    f"| {c.number} | {c.name} | {c.verdict} | {c.explanation} | {c.reference} |"
    for c in checks
  ]
  lines += [
    "",
    "The attacks' tables follow. They include check 8's eps sweep (PGD-20"
    " at other radii, up to 0.5), so their worst case over all attacks,"
    " the stages from the first sweep run on and the per-class worst case"
    " mix radii and are not robust accuracies at the model's eps; each"
    " attack's own column is.",
  ]
  return "\n".join(lines) + "\n\n" + report.to_markdown(results)


def console_summary(checks: Sequence[CheckResult]) -> str:
  """One line per check: number, verdict, name; the explanation of each
  warning below it."""
  lines = []
  for c in checks:
    lines.append(f"{c.number:>2}  {c.verdict:<7}  {c.name}")
    if c.verdict != PASS:
      lines.append(f"{'':13}{c.explanation}")
  return "\n".join(lines)


def publish(
  checks: Sequence[CheckResult],
  results: dict,
  settings: Settings,
  directory: str,
  name: str,
) -> tuple[str, str]:
  """Writes ``<name>.json`` (the checks, the settings and the attacks'
  results dict) and ``<name>.md`` to ``directory``; returns the two paths
  (``console_summary`` gives the checklist to print)."""
  json_path = os.path.join(directory, f"{name}.json")
  markdown_path = os.path.join(directory, f"{name}.md")
  report.write_json(
    {
      "run": results.get("run"),
      "settings": dataclasses.asdict(settings),
      "checks": [dataclasses.asdict(c) for c in checks],
      "attacks": results,
    },
    json_path,
  )
  with open(markdown_path, "w") as f:
    f.write(to_markdown(checks, results))
  return json_path, markdown_path
