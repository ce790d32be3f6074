"""Tests of cifs_jax.attacks: closed forms, invariants, losses, compilation."""

import functools
import importlib
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifs_jax import attacks
from cifs_jax.attacks import geometry
from cifs_jax.attacks.pgd import PARALLEL_RESTARTS, unrolling

pgd_module = importlib.import_module("cifs_jax.attacks.pgd")

EPS = 8 / 255
IMAGE_SHAPE = (4, 4, 3)
DIM = int(np.prod(IMAGE_SHAPE))


def _flat(x):
  return x.reshape(x.shape[0], -1)


def _uniform(seed, shape, low=0.0, high=1.0):
  return jax.random.uniform(
    jax.random.key(seed), shape, minval=low, maxval=high
  )


def _binary_linear(seed):
  """logits = [x.w, 0]: the margin of label 0 is x.w, of label 1 it is -x.w."""
  w = jax.random.normal(jax.random.key(seed), (DIM,))

  def logits_fn(x):
    score = _flat(x) @ w
    return jnp.stack([score, jnp.zeros_like(score)], axis=-1), []

  return w, logits_fn


def _margin(logits, y):
  """z_y - max_{j != y} z_j, per example."""
  true_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  others = jnp.where(
    jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits
  )
  return true_logit - jnp.max(others, axis=-1)


def _toy_cifs(seed, relevance_grad="stop", num_classes=5, hidden=8):
  """A small CIFS-like model: features, two probes, an input-dependent mask.

  The mask is a softmax over channels of a relevance computed from the
  features, either stopped ("stop") or differentiable ("full").
  """
  keys = jax.random.split(jax.random.key(seed), 4)
  w1 = jax.random.normal(keys[0], (DIM, hidden)) / np.sqrt(DIM) * 4
  probe = jax.random.normal(keys[1], (hidden, num_classes))
  w2 = jax.random.normal(keys[2], (hidden, num_classes)) * 2
  probe2 = jax.random.normal(keys[3], (hidden, num_classes))

  def logits_fn(x):
    features = jnp.tanh(_flat(x) @ w1 - 2.0)
    seen = (
      features if relevance_grad == "full" else jax.lax.stop_gradient(features)
    )
    mask = jax.nn.softmax((seen @ probe) @ probe.T, axis=-1) * hidden
    masked = features * mask
    return masked @ w2, [features @ probe, masked @ probe2]

  return logits_fn


def _clean_labels(logits_fn, x):
  """Labels that the model gets right on the clean inputs."""
  return jnp.argmax(logits_fn(x)[0], axis=-1)


def _fooled(logits_fn, x_adv, y):
  return np.asarray(jnp.argmax(logits_fn(x_adv)[0], axis=-1) != y)


def _jit_pgd(logits_fn, loss, config, **kwargs):
  return jax.jit(
    functools.partial(
      attacks.pgd, logits_fn, loss_fn=loss, config=config, **kwargs
    )
  )


# --- Closed forms. ---------------------------------------------------------


def test_fgsm_is_the_closed_form_optimum_of_a_binary_linear_model():
  w, logits_fn = _binary_linear(0)
  x = _uniform(1, (16,) + IMAGE_SHAPE)  # Box constraints are active.
  y = jnp.arange(16) % 2
  x_adv = attacks.pgd(
    logits_fn, x, y, None, attacks.AttackLoss(), attacks.fgsm_config(EPS)
  )
  # The margin of label 0 is x.w (of label 1, -x.w), separable over
  # coordinates: each moves by eps against the margin's sign, then the box.
  direction = jnp.where(y == 0, 1.0, -1.0)[:, None] * jnp.sign(w)
  optimum = jnp.clip(_flat(x) - EPS * direction, 0.0, 1.0)
  np.testing.assert_allclose(_flat(x_adv), optimum, atol=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_linf_pgd_reaches_the_worst_margin_of_a_binary_linear_model(
  random_start,
):
  w, logits_fn = _binary_linear(2)
  x = _uniform(3, (16,) + IMAGE_SHAPE)
  y = jnp.arange(16) % 2
  config = attacks.PGDConfig(
    eps=EPS, step_size=2 / 255, num_steps=10, random_start=random_start
  )
  x_adv = _jit_pgd(logits_fn, attacks.AttackLoss(), config)(
    x, y, jax.random.key(4)
  )
  sign = jnp.where(y == 0, 1.0, -1.0)
  worst = jnp.clip(_flat(x) - EPS * sign[:, None] * jnp.sign(w), 0.0, 1.0)
  np.testing.assert_allclose(
    _margin(logits_fn(x_adv)[0], y), sign * (worst @ w), atol=1e-5
  )


def test_l2_pgd_reaches_the_worst_margin_of_a_binary_linear_model():
  w, logits_fn = _binary_linear(5)
  x = _uniform(6, (8,) + IMAGE_SHAPE, 0.3, 0.7)  # The box stays inactive.
  y = jnp.arange(8) % 2
  eps = 0.5
  config = attacks.PGDConfig(
    eps=eps, step_size=eps / 4, num_steps=8, norm="l2", random_start=False
  )
  x_adv = _jit_pgd(logits_fn, attacks.AttackLoss(), config)(x, y, None)
  clean_margin = _margin(logits_fn(x)[0], y)
  np.testing.assert_allclose(
    _margin(logits_fn(x_adv)[0], y),
    clean_margin - eps * jnp.linalg.norm(w),
    rtol=1e-5,
    atol=1e-5,
  )


def test_linf_pgd_reaches_the_worst_margin_of_a_two_layer_model():
  # margin(x) = sum_k v_k relu(w_k . x_k + b_k), v_k > 0, where unit k reads
  # its own block x_k of the input. The minimum over the eps-ball splits over
  # units: sum_k v_k relu(w_k . x_k + b_k - eps |w_k|_1). Half the units are
  # switched off inside the ball, half are not.
  num_units, block = 4, DIM // 4
  keys = jax.random.split(jax.random.key(7), 3)
  w = jax.random.normal(keys[0], (num_units, block))
  v = jax.random.uniform(keys[1], (num_units,), minval=0.5, maxval=2.0)
  x = _uniform(8, (6,) + IMAGE_SHAPE, 0.1, 0.9)  # The box stays inactive.
  blocks = _flat(x).reshape(-1, num_units, block)
  reach = EPS * jnp.sum(jnp.abs(w), axis=1)
  clean_preactivation = reach * jnp.array([0.5, 2.0, 0.3, 1.5])
  b = clean_preactivation - jnp.einsum("nkd,kd->nk", blocks, w)  # (N, units)

  def logits_fn(x_in):
    hidden = jax.nn.relu(
      jnp.einsum("nkd,kd->nk", _flat(x_in).reshape(blocks.shape), w) + b
    )
    margin = hidden @ v
    return jnp.stack([margin, jnp.zeros_like(margin)], axis=-1), []

  y = jnp.zeros(6, jnp.int32)
  config = attacks.PGDConfig(
    eps=EPS, step_size=0.1 * EPS, num_steps=20, random_start=False
  )
  x_adv = _jit_pgd(logits_fn, attacks.AttackLoss(), config)(x, y, None)
  expected = jax.nn.relu(clean_preactivation - reach) @ v
  np.testing.assert_allclose(
    _margin(logits_fn(x_adv)[0], y), jnp.full(6, expected), atol=1e-5
  )


# --- Invariants. -----------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
@pytest.mark.parametrize("relevance_grad", ["stop", "full"])
def test_every_iterate_stays_in_the_ball_and_the_box(norm, eps, relevance_grad):
  logits_fn = _toy_cifs(0, relevance_grad)
  x = _uniform(1, (8,) + IMAGE_SHAPE)
  x = x.at[:2].set(jnp.round(x[:2]))  # Pixels at 0 and 1: the box binds.
  y = jnp.arange(8) % 5
  config = attacks.PGDConfig(
    eps=eps, step_size=eps / 2, num_steps=6, norm=norm, num_restarts=2
  )
  x_adv, trajectory = _jit_pgd(
    logits_fn, attacks.AttackLoss(beta=2.0), config, return_trajectory=True
  )(x, y, jax.random.key(2))
  assert trajectory.shape == (2, 6) + x.shape
  iterates = np.concatenate(
    [np.asarray(trajectory).reshape(-1, *x.shape), np.asarray(x_adv)[None]]
  )
  delta = (iterates - np.asarray(x)[None]).reshape(len(iterates), 8, -1)
  size = (
    np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)
  )
  assert size.max() <= eps * (1 + 1e-5)
  assert size.max() > eps / 2  # The attack did move.
  assert iterates.min() >= 0.0 and iterates.max() <= 1.0


def test_restarts_are_never_weaker_than_one_run():
  logits_fn = _toy_cifs(3)
  x = _uniform(4, (64,) + IMAGE_SHAPE)
  y = _clean_labels(logits_fn, x)
  loss = attacks.AttackLoss(beta=2.0)
  single = attacks.PGDConfig(eps=EPS, step_size=2 / 255, num_steps=3)
  multi = attacks.PGDConfig(
    eps=EPS, step_size=2 / 255, num_steps=3, num_restarts=4
  )
  key = jax.random.key(5)
  fooled_once = _fooled(
    logits_fn, _jit_pgd(logits_fn, loss, single)(x, y, key), y
  )
  fooled_restarts = _fooled(
    logits_fn, _jit_pgd(logits_fn, loss, multi)(x, y, key), y
  )
  assert np.all(fooled_restarts[fooled_once])
  assert fooled_restarts.sum() > fooled_once.sum()  # Restarts do help here.


def test_the_same_seed_gives_the_same_attack():
  logits_fn = _toy_cifs(6, "full")
  x = _uniform(7, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  config = attacks.PGDConfig(num_steps=3, num_restarts=2)
  attack = _jit_pgd(logits_fn, attacks.AttackLoss(kind="cw", beta=1.0), config)
  first = attack(x, y, jax.random.key(8))
  np.testing.assert_array_equal(first, attack(x, y, jax.random.key(8)))
  assert not np.array_equal(first, attack(x, y, jax.random.key(9)))


def test_unrolling_the_step_loop_does_not_change_the_attack():
  logits_fn = _toy_cifs(10)
  x = _uniform(11, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  loss = attacks.AttackLoss(beta=2.0)
  rolled = attacks.PGDConfig(num_steps=6)
  unrolled = attacks.PGDConfig(num_steps=6, unroll=3)
  key = jax.random.key(12)
  np.testing.assert_allclose(
    _jit_pgd(logits_fn, loss, rolled)(x, y, key),
    _jit_pgd(logits_fn, loss, unrolled)(x, y, key),
    atol=1e-6,
  )


@pytest.mark.parametrize(
  "unroll, backend, expected, num_steps",
  [
    (0, "cpu", (20, 5), 20),  # automatic on CPU: 100 steps in all, unrolled
    (0, "gpu", (1, 1), 20),
    (0, "cpu", (30, PARALLEL_RESTARTS), 30),  # 150 steps: side by side
    (0, "cpu", (100, 1), 200),  # one restart does not fit: a loop
    (40, "gpu", (20, 2), 20),  # explicit: steps first, then whole restarts
    (7, "cpu", (7, 1), 20),
  ],
)
def test_pgd_unrolls_its_steps_then_whole_restarts(
  unroll, backend, expected, num_steps
):
  config = attacks.PGDConfig(num_steps=num_steps, num_restarts=5, unroll=unroll)
  assert unrolling(config, backend) == expected


def test_unrolling_the_restarts_does_not_change_the_attack():
  logits_fn = _toy_cifs(10)
  x = _uniform(13, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  loss = attacks.AttackLoss(beta=2.0)
  rolled = attacks.PGDConfig(num_steps=3, num_restarts=3, unroll=1)
  unrolled = attacks.PGDConfig(num_steps=3, num_restarts=3, unroll=9)
  key = jax.random.key(14)
  expected = _jit_pgd(logits_fn, loss, rolled)(x, y, key)
  np.testing.assert_allclose(
    _jit_pgd(logits_fn, loss, unrolled)(x, y, key), expected, atol=1e-6
  )
  # Side by side (as automatic on CPU when the restarts exceed the cap).
  with mock.patch.object(pgd_module, "PGD_CPU_MAX_UNROLL", 3):
    parallel = attacks.PGDConfig(num_steps=3, num_restarts=3)
    if jax.default_backend() == "cpu":
      assert unrolling(parallel) == (3, PARALLEL_RESTARTS)
    np.testing.assert_allclose(
      _jit_pgd(logits_fn, loss, parallel)(x, y, key), expected, atol=1e-6
    )


def test_a_trained_model_loses_more_accuracy_to_pgd_than_to_fgsm(
  trained_mlp,
):
  logits_fn, sample = trained_mlp
  x, y = sample(jax.random.key(17), 512)

  def accuracy(x_eval):
    return float(jnp.mean(jnp.argmax(logits_fn(x_eval)[0], -1) == y))

  eps = 0.1
  loss = attacks.AttackLoss()
  fgsm = _jit_pgd(logits_fn, loss, attacks.fgsm_config(eps))(x, y, None)
  pgd = _jit_pgd(
    logits_fn, loss, attacks.PGDConfig(eps=eps, step_size=eps / 4, num_steps=20)
  )(x, y, jax.random.key(14))
  natural, under_fgsm, under_pgd = accuracy(x), accuracy(fgsm), accuracy(pgd)
  assert natural > 0.95
  assert under_pgd < under_fgsm < natural
  assert under_pgd < natural - 0.3


# --- The attacker's losses. ------------------------------------------------


def _random_heads(seed, n=6, k=5, num_probes=2):
  keys = jax.random.split(jax.random.key(seed), num_probes + 2)
  final = 3 * jax.random.normal(keys[0], (n, k))
  probes = [3 * jax.random.normal(key, (n, k)) for key in keys[1:-1]]
  labels = jax.random.randint(keys[-1], (n,), 0, k)
  return final, probes, labels


def _cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _cw(logits, labels, confidence):
  return -jnp.maximum(_margin(logits, labels) + confidence, 0.0)


@pytest.mark.parametrize("kind", ["ce", "cw"])
def test_attack_loss_mixes_heads_with_eq3_weights(kind):
  final, probes, labels = _random_heads(0)
  confidence = 5.0
  head_loss = (
    _cross_entropy
    if kind == "ce"
    else functools.partial(_cw, confidence=confidence)
  )
  per_head = [head_loss(logits, labels) for logits in [final] + probes]
  probe_mean = (per_head[1] + per_head[2]) / 2

  def loss(beta, probe=None):
    return attacks.AttackLoss(
      kind=kind, beta=beta, probe=probe, confidence=confidence
    )(final, probes, labels)

  np.testing.assert_allclose(loss(0.0), per_head[0], rtol=1e-5)
  np.testing.assert_allclose(
    loss(2.0), (per_head[0] + 2 * probe_mean) / 3, rtol=1e-5
  )
  np.testing.assert_allclose(loss(math.inf), probe_mean, rtol=1e-5)
  np.testing.assert_allclose(loss(math.inf, probe=1), per_head[2], rtol=1e-5)


def test_beta_zero_attacks_the_final_head_alone():
  logits_fn = _toy_cifs(20, "full")
  final_only = lambda x: (logits_fn(x)[0], [])  # noqa: E731
  x = _uniform(21, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  config = attacks.PGDConfig(num_steps=4)
  key = jax.random.key(22)
  np.testing.assert_array_equal(
    _jit_pgd(logits_fn, attacks.AttackLoss(beta=0.0), config)(x, y, key),
    _jit_pgd(final_only, attacks.AttackLoss(), config)(x, y, key),
  )


@pytest.mark.parametrize("probe", [None, 1])
def test_beta_inf_ignores_the_final_head(probe):
  logits_fn = _toy_cifs(23)
  other_final_head = _toy_cifs(24)
  swapped = lambda x: (other_final_head(x)[0], logits_fn(x)[1])  # noqa: E731
  x = _uniform(25, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  loss = attacks.AttackLoss(beta=math.inf, probe=probe)
  config = attacks.PGDConfig(num_steps=4)
  key = jax.random.key(26)
  np.testing.assert_array_equal(
    _jit_pgd(logits_fn, loss, config)(x, y, key),
    _jit_pgd(swapped, loss, config)(x, y, key),
  )


def test_attack_loss_rejects_inconsistent_settings():
  final, probes, labels = _random_heads(1)
  with pytest.raises(ValueError, match=r"beta must be >= 0 .*got -1.0"):
    attacks.AttackLoss(beta=-1.0)
  with pytest.raises(
    ValueError, match=r"only with beta = inf, got beta = 2.0 and probe = 0"
  ):
    attacks.AttackLoss(beta=2.0, probe=0)
  with pytest.raises(ValueError, match=r"kind must be one of .*got 'dlr'"):
    attacks.AttackLoss(kind="dlr")
  with pytest.raises(ValueError, match=r"beta = inf attacks only the probes"):
    attacks.AttackLoss(beta=math.inf)(final, [], labels)
  with pytest.raises(ValueError, match=r"Restarts without a random start"):
    attacks.PGDConfig(random_start=False, num_restarts=2)


# --- Compilation and sharding. ---------------------------------------------


def _two_devices():
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 2 CPU devices)")
  return jax.local_devices()[:2]


def test_attack_runs_inside_pmap_with_per_example_keys():
  _two_devices()
  logits_fn = _toy_cifs(30, "full")
  x = _uniform(31, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  keys = jax.random.split(jax.random.key(32), 8)
  loss = attacks.AttackLoss(beta=2.0)
  config = attacks.PGDConfig(num_steps=3, num_restarts=2)
  whole = _jit_pgd(logits_fn, loss, config)(x, y, keys)
  per_device = jax.pmap(
    functools.partial(attacks.pgd, logits_fn, loss_fn=loss, config=config)
  )(x.reshape((2, 4) + IMAGE_SHAPE), y.reshape(2, 4), keys.reshape(2, 4))
  np.testing.assert_allclose(per_device.reshape(whole.shape), whole, atol=1e-6)


def test_attack_on_a_batch_sharded_over_devices_matches_one_device():
  mesh = Mesh(np.asarray(_two_devices()), ("batch",))
  sharded = NamedSharding(mesh, PartitionSpec("batch"))
  logits_fn = _toy_cifs(33)
  x = _uniform(34, (8,) + IMAGE_SHAPE)
  y = jnp.arange(8) % 5
  keys = jax.random.split(jax.random.key(35), 8)
  attack = _jit_pgd(
    logits_fn,
    attacks.AttackLoss(kind="cw", beta=1.0),
    attacks.PGDConfig(num_steps=3),
  )
  x_adv = attack(*jax.device_put((x, y, keys), sharded))
  assert x_adv.sharding.is_equivalent_to(sharded, x_adv.ndim)
  np.testing.assert_allclose(x_adv, attack(x, y, keys), atol=1e-6)


@pytest.mark.parametrize(
  "unroll, num_steps, backend, expected",
  [
    (3, 10, "cpu", 3),  # explicit: kept
    (3, 10, "gpu", 3),
    (0, 10, "cpu", 10),  # automatic on CPU: the whole short loop
    (0, 100, "cpu", geometry.CPU_MAX_UNROLL),
    (0, 10, "gpu", 1),  # automatic elsewhere: rolled
    (0, 100, "tpu", 1),
  ],
)
def test_loop_unroll_is_explicit_or_chosen_per_backend(
  unroll, num_steps, backend, expected
):
  assert geometry.loop_unroll(unroll, num_steps, backend) == expected


def test_automatic_unroll_follows_the_default_backend():
  assert geometry.loop_unroll(0, 5) == (
    5 if jax.default_backend() == "cpu" else 1
  )


def test_negative_unroll_is_rejected():
  with pytest.raises(ValueError, match="unroll must be >= 0"):
    geometry.loop_unroll(-1, 10)
  with pytest.raises(ValueError, match="unroll must be >= 0"):
    attacks.PGDConfig(unroll=-1)
  with pytest.raises(ValueError, match="unroll must be >= 0"):
    attacks.APGDConfig(unroll=-1)
