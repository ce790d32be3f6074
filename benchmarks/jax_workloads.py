"""The JAX side of the benchmarks: the project's own compiled programs.

- ``train_step``: ``make_train_step`` exactly as training compiles it (one
  device, shard_map, state donated), on random CIFAR-sized uint8 images:
  augmentation, the configured attack (PGD-10 AT by default), one SGD step.
- ``pgd20_eval``: the paper protocol's PGD-20 (eps 8/255, step eps / 10, no
  random start) on the joint loss at beta_atk = 2 (CIFS; vanilla: the final
  head), plus natural and adversarial top-1 counts, as the evaluator runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from cifs_jax import attacks, data, evaluation, experiment_config, models
from cifs_jax.attacks import geometry
from cifs_jax.attacks.pgd import PGD_CPU_MAX_UNROLL
from cifs_jax.parallel import BATCH_AXIS, Parallel
from cifs_jax.training import step as step_lib, train_state

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
ATTACK_BETA = 2.0  # the paper protocol's beta_atk of the timed run


@dataclasses.dataclass
class Workload:
  """A compiled program ready to run: ``run()`` blocks until it is done."""

  run: Callable[[], None]
  compile_s: float
  flops: float | None  # per ``run()``
  compiled: Any = None  # the compiled program (its HLO for profiles)


def experiment(
  defense: str, width: int, method: str, attack_steps: int, bf16: bool
):
  """The base config (PGD-10 AT of a ResNet-18) with these changes."""
  config = experiment_config.base_config()
  config.model.defense = defense
  config.model.width = width
  config.train.method = method
  config.attack.num_steps = attack_steps
  config.half_precision = bf16
  return config


def random_images(
  num_images: int, seed: int = 0, image_shape=IMAGE_SHAPE
) -> data.Split:
  """A split of random uint8 images (N, *image_shape) and labels."""
  rng = np.random.default_rng(seed)
  return data.Split(
    rng.integers(0, 256, (num_images, *image_shape), dtype=np.uint8),
    rng.integers(0, NUM_CLASSES, num_images).astype(np.int32),
    NUM_CLASSES,
  )


def _dtype(config):
  return jnp.bfloat16 if config.half_precision else None


def kernel_shapes(config) -> set[tuple[int, ...]]:
  """The sorted dimensions of every convolution kernel of ``config.model``
  (a convolution whose output has them computes a weight gradient)."""
  variables = jax.eval_shape(
    functools.partial(models.build_model(config.model).init, train=False),
    jax.random.key(0),
    jnp.zeros((1, *IMAGE_SHAPE)),
  )
  return {
    tuple(sorted(leaf.shape))
    for leaf in jax.tree.leaves(variables["params"])
    if leaf.ndim == 4
  }


def _train_program(model, config, parallel):
  """The training step of ``config``, compiled as training compiles it."""
  return parallel.compile(
    step_lib.make_train_step(
      model, config, data.augment_options(config.data), steps_per_epoch=1
    ),
    sharded_args=(False, False, True),
    donate_first=True,
  )


def _fully_unrolled(config):
  """``config`` with the attack loop unrolled: XLA's cost analysis counts
  a rolled loop's body once, whatever its trip count."""
  config = config.copy_and_resolve_references()
  config.attack.unroll = config.attack.num_steps
  return config


def _unrolls_fully(attack_config) -> bool:
  """Whether the compiled attack loop is unrolled (then its cost analysis
  counts every step)."""
  steps = attack_config.num_steps
  unroll = geometry.loop_unroll(
    attack_config.unroll, steps, cpu_max=PGD_CPU_MAX_UNROLL
  )
  return unroll >= steps


def train_step(config, batch_size: int, image_shape=IMAGE_SHAPE) -> Workload:
  """One training step of ``config`` on a batch of ``batch_size`` random
  images of ``image_shape`` (H, W, C)."""
  model = models.build_model(
    config.model, dtype=_dtype(config), bn_axis_name=BATCH_AXIS
  )
  parallel = Parallel.create("shard_map", jax.local_devices()[:1])
  state = parallel.replicate(
    train_state.create_train_state(
      models.build_model(config.model), image_shape, config, 1
    )
  )
  split = parallel.replicate(random_images(batch_size, image_shape=image_shape))
  indices = parallel.shard(np.arange(batch_size, dtype=np.int32))
  args = (state, split, indices)
  compiled, compile_s = harness.compile_ahead(
    _train_program(model, config, parallel), *args
  )
  if _unrolls_fully(config.attack):
    step_flops = harness.flops(compiled)
  else:
    unrolled = _train_program(model, _fully_unrolled(config), parallel)
    step_flops = harness.flops(unrolled.lower(*args))
  states = [state]

  def run():
    states[0], metrics = compiled(states[0], split, indices)
    jax.block_until_ready(metrics)

  return Workload(run, compile_s, step_flops, compiled)


def _pgd20_correct(attack):
  """Jitted (logits_fn, uint8 images, y, head weights) -> (natural top-1
  correct, adversarial top-1 correct) under ``attack``."""

  @jax.jit
  def correct(logits_fn, images, y, weights):
    x = data.to_float(images)
    x_adv = attack(logits_fn, x, y, None, weights)
    top1 = lambda inputs: jnp.argmax(logits_fn(inputs)[0], -1)
    return jnp.sum(top1(x) == y), jnp.sum(top1(x_adv) == y)

  return correct


def pgd20_eval(config, batch_size: int, num_images: int) -> Workload:
  """PGD-20 evaluation of ``num_images`` in batches of ``batch_size``."""
  model = models.build_model(config.model, dtype=_dtype(config))
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(config.seed), jnp.zeros((1, *IMAGE_SHAPE))
  )
  logits_fn = jax.tree_util.Partial(
    functools.partial(model.apply, train=False), variables
  )
  (pgd20,) = evaluation.paper_protocol().select(["pgd20"]).attacks
  num_probes = len(jax.eval_shape(logits_fn, jnp.zeros((1, *IMAGE_SHAPE)))[1])
  weights = attacks.head_weights(
    ATTACK_BETA if num_probes else 0.0, None, num_probes
  )

  split = random_images(num_images)
  batches = [
    (
      jnp.asarray(split.images[i : i + batch_size]),
      split.labels[i : i + batch_size],
    )
    for i in range(0, num_images, batch_size)
  ]
  args = (logits_fn, *batches[0], weights)
  compiled, compile_s = harness.compile_ahead(_pgd20_correct(pgd20), *args)
  if _unrolls_fully(pgd20.config):
    batch_flops = harness.flops(compiled)
  else:
    unrolled = dataclasses.replace(
      pgd20,
      config=dataclasses.replace(pgd20.config, unroll=pgd20.config.num_steps),
    )
    batch_flops = harness.flops(_pgd20_correct(unrolled).lower(*args))

  def run():
    jax.block_until_ready(
      [compiled(logits_fn, images, y, weights) for images, y in batches]
    )

  return Workload(
    run, compile_s, batch_flops and batch_flops * len(batches), compiled
  )
