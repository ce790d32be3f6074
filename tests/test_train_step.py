"""The compiled training step: device-count invariance, FAT, optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifs_jax import attacks, data, experiment_config, models
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax import losses
from cifs_jax.training import methods
from cifs_jax.training import step as step_lib, train_state
from tests.compilations import counted_compilations


def smoke_config(*variants):
  """The smoke variant on a ResNet-10 of width 4: quick to compile."""
  config = experiment_config.apply_variants(
    experiment_config.base_config(), ",".join(("smoke",) + variants)
  )
  config.model.name = "resnet10"
  config.model.width = 4
  return config


def random_split(num_examples=48, seed=0):
  rng = np.random.default_rng(seed)
  return data.Split(
    rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8),
    rng.integers(0, 10, num_examples).astype(np.int32),
    10,
  )


def run_steps(
  config,
  state,
  split,
  parallel_mode,
  num_devices,
  num_steps=3,
  batch_size=16,
  steps_per_epoch=3,
):
  model = models.build_model(config.model, bn_axis_name=BATCH_AXIS)
  parallel = Parallel.create(parallel_mode, jax.local_devices()[:num_devices])
  step = parallel.compile(
    step_lib.make_train_step(
      model, config, data.augment_options(config.data), steps_per_epoch
    ),
    sharded_args=(False, False, True),
  )
  state = parallel.replicate(state)
  device_split = parallel.replicate(split)
  for i in range(num_steps):
    indices = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)
    state, metrics = step(state, device_split, parallel.shard(indices))
  return jax.tree.map(np.asarray, parallel.unreplicate(state))


@pytest.mark.parametrize(
  "method",
  [
    pytest.param("pgd_at", marks=pytest.mark.slow),
    pytest.param("natural", marks=pytest.mark.long),
    pytest.param("fat", marks=pytest.mark.long),
    pytest.param("trades", marks=pytest.mark.long),
  ],
)
def test_two_devices_equal_one_device(x64, method):
  """pmap and shard_map over 2 devices give the 1-device parameters after 3
  steps of ``method`` on the same global batches (float64, synced batch
  norm)."""
  config = smoke_config(method)
  split = random_split()
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 3)
  to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  state = state.replace(
    params=to64(state.params), batch_stats=to64(state.batch_stats)
  )
  single = run_steps(config, state, split, "pmap", 1)
  assert int(single.step) == 3
  changed = jax.tree.map(
    lambda a, b: np.max(np.abs(a - b)), single.params, state.params
  )
  assert min(jax.tree.leaves(changed)) > 0  # every parameter was trained
  for mode in ("pmap", "shard_map"):
    sharded = run_steps(config, state, split, mode, 2)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
      (sharded.params, sharded.batch_stats),
      (single.params, single.batch_stats),
    )


def test_learning_rate_schedule_and_weight_decay_match_reference():
  config = experiment_config.base_config().train
  steps_per_epoch = 390
  schedule = train_state.learning_rate_schedule(config, steps_per_epoch)
  rate_in_epoch = lambda epoch: float(schedule(epoch * steps_per_epoch))
  # PyTorch MultiStepLR([75, 90], 0.1) stepped per epoch, epochs from 0.
  assert rate_in_epoch(0) == pytest.approx(0.1)
  assert float(schedule(75 * steps_per_epoch - 1)) == pytest.approx(0.1)
  assert rate_in_epoch(75) == pytest.approx(0.01)
  assert float(schedule(90 * steps_per_epoch - 1)) == pytest.approx(0.01)
  assert rate_in_epoch(90) == pytest.approx(0.001)
  assert rate_in_epoch(119) == pytest.approx(0.001)
  # torch.optim.SGD(lr, momentum=0.9, weight_decay=2e-4), by hand:
  # d = g + wd * w; buf = momentum * buf + d; w -= lr * buf.
  optimizer = train_state.make_optimizer(config, steps_per_epoch)
  weights = jnp.array([1.0, -2.0])
  opt_state = optimizer.init(weights)
  grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 1.0])]
  expected_w, buffer = np.array([1.0, -2.0]), np.zeros(2)
  for grad in grads:
    updates, opt_state = optimizer.update(grad, opt_state, weights)
    weights = optax.apply_updates(weights, updates)
    buffer = 0.9 * buffer + (np.asarray(grad) + 2e-4 * expected_w)
    expected_w = expected_w - 0.1 * buffer
  np.testing.assert_allclose(weights, expected_w, rtol=1e-6)


def clip_to_ball(x_adv, x, eps):
  """Into the L-inf ball of radius eps around x, then into [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def reference_pgd(logits_fn, loss_fn, x, y, config, tau=None, x_start=None):
  """L-inf PGD from ``x_start`` (default x), written out step by step.

  With ``tau``, FAT's early stop: an example stops moving at the check where
  the final head misclassifies it for the (tau + 1)-th time.
  """
  x_adv = x if x_start is None else clip_to_ball(x_start, x, config.eps)
  misses = np.zeros(len(y), int)
  moving = np.ones(len(y), bool)
  total_loss = lambda v: jnp.sum(loss_fn(*logits_fn(v), y))
  gradient = jax.jit(jax.grad(total_loss))
  for _ in range(config.num_steps):
    grad = gradient(x_adv)
    if tau is not None:
      wrong = np.argmax(logits_fn(x_adv)[0], -1) != np.asarray(y)
      misses += wrong & moving
      moving &= misses <= tau
    stepped = clip_to_ball(
      x_adv + config.step_size * jnp.sign(grad), x, config.eps
    )
    keep = moving.reshape((-1,) + (1,) * (x.ndim - 1))
    x_adv = jnp.where(keep, stepped, x_adv)
  return x_adv


def linear_logits_fn(weights):
  return lambda x: (x.reshape(x.shape[0], -1) @ weights, [])


def test_friendly_pgd_freezes_misclassified_examples():
  """FAT with tau = 0 leaves examples that are already wrong where they are
  and attacks the others like PGD, inside the eps-ball and [0, 1]."""
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, (32, 12)), jnp.float32)
  predicted = np.argmax(np.asarray(x @ weights), axis=1)
  labels = jnp.asarray(
    np.where(np.arange(32) % 2 == 0, predicted, (predicted + 1) % 3)
  )
  config = attacks.PGDConfig(
    eps=0.1, step_size=0.02, num_steps=10, random_start=False
  )
  loss = losses.defense_loss("none", beta=2.0)
  x_fat = attacks.friendly_pgd(
    linear_logits_fn(weights), x, labels, None, loss, config, tau=0
  )
  x_pgd = attacks.pgd(linear_logits_fn(weights), x, labels, None, loss, config)
  wrong_at_start = predicted != np.asarray(labels)
  np.testing.assert_array_equal(x_fat[wrong_at_start], x[wrong_at_start])
  assert np.all(np.abs(x_fat - x) <= 0.1 + 1e-6)
  assert np.all((x_fat >= 0) & (x_fat <= 1))
  # An example that PGD never fools is never stopped: FAT equals PGD there.
  never_fooled = ~wrong_at_start & (
    np.argmax(np.asarray(x_pgd @ weights), 1) == np.asarray(labels)
  )
  np.testing.assert_allclose(
    x_fat[never_fooled], x_pgd[never_fooled], atol=1e-6
  )
  # tau: the number of misclassified checks an example may survive.
  results = {}
  for tau in (0, 1, 3):
    results[tau] = attacks.friendly_pgd(
      linear_logits_fn(weights), x, labels, None, loss, config, tau=tau
    )
    expected = reference_pgd(
      linear_logits_fn(weights), loss, x, labels, config, tau=tau
    )
    np.testing.assert_allclose(results[tau], expected, rtol=0, atol=1e-6)
  # The case is one where tau matters: fewer examples are frozen early.
  assert np.abs(results[3] - results[0]).max() > 0.01
  assert np.abs(results[3] - x).sum() > np.abs(results[0] - x).sum()


@pytest.mark.parametrize("method", ["natural", "fat", "trades"])
def test_every_method_trains(method):
  config = smoke_config(method, "cas" if method == "fat" else "cifs")
  split = random_split(32)
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 2)
  trained = run_steps(config, state, split, "pmap", 2, num_steps=2)
  assert int(trained.step) == 2
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(trained.params))


def test_fat_tau_schedule_is_fats_dynamic_tau():
  """FAT's reference (FAT.py, ``adjust_tau``) with milestones (50, 90):
  tau 0 in epochs 1-50, 1 in 51-90, 2 after; 10 steps per epoch."""
  config = smoke_config("fat")
  config.fat.tau_milestones = (50, 90)
  tau = jax.jit(methods.fat_tau_schedule(config, steps_per_epoch=10))
  steps = {0: 0, 499: 0, 500: 1, 899: 1, 900: 2, 1199: 2}
  assert {s: int(tau(s)) for s in steps} == steps
  config.fat.tau = 3
  assert int(tau(0)) == 0  # the schedule read the config when made
  tau = methods.fat_tau_schedule(config, steps_per_epoch=10)
  assert [int(tau(s)) for s in (0, 500, 900)] == [3, 4, 5]


def test_friendly_pgd_takes_a_traced_tau():
  """One compilation serves every tau; examples that the linear model gets
  wrong from the start take exactly tau steps of 0.02 (the eps-ball of 0.1
  is not reached)."""
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, (32, 12)), jnp.float32)
  labels = jnp.asarray((np.argmax(np.asarray(x @ weights), 1) + 1) % 3)
  config = attacks.PGDConfig(
    eps=0.1, step_size=0.02, num_steps=10, random_start=False
  )
  loss = losses.defense_loss("none", beta=2.0)

  @jax.jit
  def attack(tau):
    return attacks.friendly_pgd(
      linear_logits_fn(weights), x, labels, None, loss, config, tau
    )

  with counted_compilations() as compilations:
    distances = [np.abs(np.asarray(attack(jnp.int32(t)) - x)) for t in range(3)]
  np.testing.assert_array_equal(distances[0], 0)
  np.testing.assert_allclose(distances[1], 0.02, rtol=1e-5)
  # A second step may move a pixel back; it moves none further.
  assert np.max(distances[2]) == pytest.approx(0.04, rel=1e-5)
  assert compilations.count(f"jit({attack.__name__})") == 1


@pytest.mark.slow
def test_fat_tau_schedule_reaches_the_attack_of_one_compiled_step(
  monkeypatch,
):
  """The step passes the scheduled tau to FAT's attack: with a milestone at
  epoch 1 and 2 steps per epoch, steps 0-3 attack with tau 0, 0, 1, 1
  (seen on the host as the attack runs), all from one compilation."""
  taus = []
  friendly_pgd = attacks.friendly_pgd

  def recording(logits_fn, x, y, key, loss_fn, pgd_config, tau, **kwargs):
    jax.debug.callback(lambda t: taus.append(int(t)), tau)
    return friendly_pgd(
      logits_fn, x, y, key, loss_fn, pgd_config, tau, **kwargs
    )

  monkeypatch.setattr(step_lib.attacks, "friendly_pgd", recording)
  config = smoke_config("fat")
  config.fat.tau_milestones = (1,)
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 2)
  run_steps(
    config,
    state,
    random_split(64),
    "pmap",
    1,
    num_steps=4,
    steps_per_epoch=2,
  )
  assert taus == [0, 0, 1, 1]


def captured_attack_losses(monkeypatch, config, make_step):
  """The loss functions that the step ``make_step(model, state, split) ->
  (step, vmap in_axes, args)`` passes to ``attacks.pgd`` (traced only)."""
  losses_seen = []
  pgd = attacks.pgd

  def recording_pgd(logits_fn, x, y, key, loss_fn, pgd_config):
    losses_seen.append(loss_fn)
    return pgd(logits_fn, x, y, key, loss_fn, pgd_config)

  monkeypatch.setattr(step_lib.attacks, "pgd", recording_pgd)
  model = models.build_model(config.model, bn_axis_name=BATCH_AXIS)
  state = jax.eval_shape(
    lambda: train_state.create_train_state(model, (32, 32, 3), config, 1)
  )
  split = random_split(4)
  step, in_axes, args = make_step(model, state, split)
  jax.eval_shape(jax.vmap(step, in_axes=in_axes, axis_name=BATCH_AXIS), *args)
  return losses_seen


def test_training_attack_uses_the_loss_beta_and_the_check_beta_atk(
  monkeypatch,
):
  """PGD crafting training examples maximises the training loss (beta
  ``train.loss_beta``); the per-epoch check, the joint loss at
  ``eval.beta_atk``. Compared on fixed logits with Eq. 3 at those betas."""
  config = smoke_config()
  config.train.loss_beta, config.eval.beta_atk = 0.5, 7.0
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)
  probes = [jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)] * 2
  labels = jnp.arange(5)

  def train_step(model, state, split):
    step = step_lib.make_train_step(
      model, config, data.augment_options(config.data), 1
    )
    indices = np.arange(4, dtype=np.int32)[None]
    return step, (None, None, 0), (state, split, indices)

  def eval_step(model, state, split):
    step = step_lib.make_eval_step(model, config)
    batch = data.Batch(
      split.images[None], split.labels[None], np.ones((1, 4), bool)
    )
    return step, (None, 0), (state, batch)

  for make_step, beta in ((train_step, 0.5), (eval_step, 7.0)):
    (loss_fn,) = captured_attack_losses(monkeypatch, config, make_step)
    np.testing.assert_allclose(
      loss_fn(logits, probes, labels),
      losses.defense_loss("cifs", beta)(logits, probes, labels),
      rtol=1e-6,
    )
    monkeypatch.undo()


def test_config_rejects_a_negative_unroll():
  config = experiment_config.base_config()
  config.attack.unroll = -1
  with pytest.raises(ValueError, match="config.attack.unroll=-1"):
    experiment_config.validate(config)


# ------------------------------------------------- one update, by hand


def cross_entropy(logits, labels):
  """-log softmax(logits)[label], per example: (N,)."""
  log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def reference_training_loss(kind, config):
  """The per-example training loss (N,) of a model with defence ``kind``:
  CIFS: the authors' 3 / (1 + beta) * (CE + beta * mean probe CE); CAS:
  CE + beta * mean auxiliary CE (Bai et al.)."""
  beta, scale = config.train.loss_beta, config.train.loss_scale

  def loss(logits, probes, labels):
    probe_term = sum(cross_entropy(p, labels) for p in probes) / len(probes)
    if kind == "cas":
      return cross_entropy(logits, labels) + beta * probe_term
    return (
      scale / (1 + beta) * (cross_entropy(logits, labels) + beta * probe_term)
    )

  return loss


def kl_divergence(natural_logits, adversarial_logits):
  """KL(softmax(natural) || softmax(adversarial)) per example: (N,)."""
  p = jax.nn.softmax(natural_logits, axis=-1)
  return jnp.sum(
    p
    * (
      jax.nn.log_softmax(natural_logits, axis=-1)
      - jax.nn.log_softmax(adversarial_logits, axis=-1)
    ),
    axis=-1,
  )


def one_step_config(method, defense):
  """A ResNet-10 of width 2, no augmentation, a deterministic 2-step attack
  and a weight decay large enough to show in the update (float64 tests)."""
  config = smoke_config(method, defense)
  config.model.width = 2
  config.model.cifs.mlp_hidden = 8
  config.data.augment.crop_padding = 0
  config.data.augment.flip = False
  # TRADES' inner KL has a zero gradient at the natural input: it needs its
  # random start (drawn below as the step draws it).
  config.attack.random_start = method == "trades"
  # Dyadic radius and step: on binary images every iterate is exact in
  # float32, whatever the order of the attack's additions and clips.
  config.attack.eps = 1 / 32
  config.attack.step_size = 1 / 64
  config.train.weight_decay = 0.01
  config.fat.tau = 1
  return config


def expected_update(config, state, x, y):
  """(params, batch_stats) after one step of ``config.train.method`` on the
  batch (x, y), computed here: the attack written out, the loss written out,
  its gradient, and SGD's first step w - lr * (g + wd * w)."""
  method = config.train.method
  model = models.build_model(config.model)
  kind = model.defense.kind
  train_loss = reference_training_loss(kind, config)
  eval_fn = lambda v: model.apply(state.variables, v, train=False)
  attack = methods.attack_config(config.attack)
  x_train = x
  if method in ("pgd_at", "fat"):
    tau = config.fat.tau if method == "fat" else None
    x_train = reference_pgd(eval_fn, train_loss, x, y, attack, tau)
  elif method == "trades":
    natural = eval_fn(x)[0]
    inner = lambda logits, probes, labels: kl_divergence(labels, logits)
    # The step's per-example attack keys, folded with the restart number
    # (0); the official TRADES start 0.001 * N(0, 1), or a uniform draw in
    # the eps-ball.
    indices = jnp.arange(len(y), dtype=jnp.int32)
    _, keys = step_lib._example_keys(state, indices)
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
    if config.trades.start == "normal":
      draw = lambda key, image: 0.001 * jax.random.normal(
        key, image.shape, image.dtype
      )
    else:
      draw = lambda key, image: jax.random.uniform(
        key, image.shape, image.dtype, -attack.eps, attack.eps
      )
    noise = jax.vmap(draw)(keys, x)
    x_train = reference_pgd(eval_fn, inner, x, natural, attack, None, x + noise)

  def forward(params, inputs, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}
    return model.apply(
      variables, inputs, train=True, labels=y, mutable=["batch_stats"]
    )

  def objective(params):
    if method != "trades":
      (logits, probes), _ = forward(params, x_train, state.batch_stats)
      return jnp.mean(train_loss(logits, probes, y))
    # In training mode the outputs use batch statistics only.
    (logits, probes), _ = forward(params, x, state.batch_stats)
    (adversarial, _), _ = forward(params, x_train, state.batch_stats)
    return jnp.mean(
      train_loss(logits, probes, y)
      + config.trades.beta * kl_divergence(logits, adversarial)
    )

  grads = jax.jit(jax.grad(objective))(state.params)
  rate, decay = config.train.learning_rate, config.train.weight_decay
  params = jax.tree.map(
    lambda w, g: w - rate * (g + decay * w), state.params, grads
  )
  stats = forward(state.params, x_train, state.batch_stats)[1]["batch_stats"]
  if method == "trades":
    # Running statistics move twice: r1 = 0.9 r + 0.1 m_nat, then
    # 0.9 r1 + 0.1 m_adv = 0.9 r1 + (r_adv - 0.9 r), with r_adv the one
    # update from r on the adversarial batch alone.
    natural_stats = forward(state.params, x, state.batch_stats)[1]
    stats = jax.tree.map(
      lambda once_natural, once_adversarial, old: 0.9 * once_natural
      + once_adversarial
      - 0.9 * old,
      natural_stats["batch_stats"],
      stats,
      state.batch_stats,
    )
  return params, stats


@pytest.mark.parametrize(
  "method,defense,trades_start",
  [
    # PGD-AT, the default method, runs by default; TRADES exercises most
    # (two forward passes, KL, the random start) but takes ~80-150 s of CPU.
    ("pgd_at", "cifs", "normal"),
    pytest.param("trades", "cifs", "normal", marks=pytest.mark.long),
    pytest.param("trades", "cifs", "uniform", marks=pytest.mark.long),
    pytest.param("natural", "cifs", "normal", marks=pytest.mark.long),
    pytest.param("fat", "cas", "normal", marks=pytest.mark.long),
  ],
)
def test_one_update_matches_the_loss_and_sgd_written_out(
  x64, method, defense, trades_start
):
  config = one_step_config(method, defense)
  config.trades.start = trades_start
  # Binary images: 0 and 1 are exact in float32 however they are computed.
  split = random_split(8, seed=1)
  binary = np.where(split.images > 127, 255, 0).astype(np.uint8)
  split = data.Split(binary, split.labels, split.num_classes)
  model = models.build_model(config.model)
  state = train_state.create_train_state(model, (32, 32, 3), config, 1)
  to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  state = state.replace(
    params=to64(state.params), batch_stats=to64(state.batch_stats)
  )
  trained = run_steps(config, state, split, "pmap", 1, 1, batch_size=8)
  x = jnp.asarray(split.images, jnp.float32) / 255.0
  params, stats = expected_update(config, state, x, jnp.asarray(split.labels))
  jax.tree.map(
    # Float32 attack gradients that vanish can take either sign: a relative
    # 1e-6 of each array's scale.
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max()
    ),
    (trained.params, trained.batch_stats),
    (params, stats),
  )
