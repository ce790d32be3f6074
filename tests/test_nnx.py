"""The CIFS layer and the backbones inside Flax NNX, through flax.nnx.bridge.

Every NNX computation is compared with the same computation on the linen
module with the same variables: forward passes in both modes, the training
loss's second-order gradient to a probe, and one PGD-AT step.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import optax
import pytest

from cifs_jax import attacks, losses, models
from cifs_jax.models import nnx_bridge

NUM_CLASSES = 10
# float32, same variables, same operations: equal up to XLA's fusion choices.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
PGD = attacks.PGDConfig(eps=8 / 255, step_size=2 / 255, num_steps=2)
ATTACK_LOSS = attacks.AttackLoss(kind="ce", beta=2.0)


def tiny_backbone():
  """A CIFS ResNet-10 of width 4 (CIFS after layer3 and layer4)."""
  config = models.default_config()
  config.name = "resnet10"
  config.width = 4
  return models.build_model(config)


@pytest.fixture(scope="module")
def batch():
  """Four 28x28x1 images in [0, 1] and their labels."""
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  return x, jnp.array([0, 3, 5, 9])


@pytest.fixture(scope="module")
def backbone(batch):
  """(linen model, its variables)."""
  model = tiny_backbone()
  return model, model.init(jax.random.key(0), batch[0])


def test_lazy_init_gives_linen_init_and_round_trips(backbone, batch):
  """The key given to lazy_init yields linen's init(key, x); loads stick."""
  linen_model, variables = backbone
  model = nnx.bridge.ToNNX(linen_model)
  model.lazy_init(batch[0], rngs=jax.random.key(0))
  chex.assert_trees_all_equal(nnx_bridge.linen_variables(model), variables)

  shifted = jax.tree.map(lambda v: v + 1.0, variables)
  nnx_bridge.load_linen_variables(model, shifted)
  chex.assert_trees_all_equal(nnx_bridge.linen_variables(model), shifted)


def test_load_rejects_variables_of_another_model(backbone, batch):
  """Wrong shapes, unknown and missing paths are named; nothing is loaded."""
  linen_model, variables = backbone
  model = nnx.bridge.ToNNX(linen_model)
  model.lazy_init(batch[0], rngs=jax.random.key(0))
  wider = jax.tree.map(jnp.asarray, variables)  # new dicts, same arrays
  wider["params"]["conv1"]["kernel"] = jnp.zeros((3, 3, 1, 8))
  with pytest.raises(
    ValueError, match=r"params/conv1/kernel: model \(3, 3, 1, 4\), variables"
  ):
    nnx_bridge.load_linen_variables(model, wider)

  extra_kernel = {"extra": {"kernel": jnp.zeros(3)}}
  extra = {**variables, "params": {**variables["params"], **extra_kernel}}
  with pytest.raises(ValueError, match=r"unknown params/extra/kernel \(3,\)"):
    nnx_bridge.load_linen_variables(model, extra)

  without_stats = {"params": variables["params"]}
  with pytest.raises(ValueError, match=r"missing batch_stats/bn1/mean"):
    nnx_bridge.load_linen_variables(model, without_stats)
  chex.assert_trees_all_equal(nnx_bridge.linen_variables(model), variables)


def test_backbone_inference_matches_linen(backbone, batch):
  linen_model, variables = backbone
  x, _ = batch
  model = nnx_bridge.from_linen(linen_model, variables, x)
  chex.assert_trees_all_close(
    model(x), linen_model.apply(variables, x), **TOLERANCE
  )


def test_backbone_training_mode_matches_linen(backbone, batch):
  linen_model, variables = backbone
  x, y = batch
  model = nnx_bridge.from_linen(linen_model, variables, x)
  outputs = model(x, train=True, labels=y, mutable=["batch_stats"])
  linen_outputs, updates = linen_model.apply(
    variables, x, train=True, labels=y, mutable=["batch_stats"]
  )
  chex.assert_trees_all_close(outputs, linen_outputs, **TOLERANCE)
  new_stats = nnx_bridge.linen_variables(model)["batch_stats"]
  chex.assert_trees_all_close(new_stats, updates["batch_stats"], **TOLERANCE)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(new_stats, variables["batch_stats"])


class MaskedClassifier(nnx.Module):
  """An NNX model with a CIFS layer: conv, CIFS, average pool, linear head.

  ``features``: an example input of the CIFS layer, (N, H, W, 6), for the
  shapes of its variables.
  """

  def __init__(self, cifs: models.CIFS, features: jax.Array, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.cifs = nnx.bridge.ToNNX(cifs)
    self.cifs.lazy_init(features, rngs=rngs.params())
    self.head = nnx.Linear(6, NUM_CLASSES, rngs=rngs)

  def __call__(self, x, labels=None, train=False):
    """(N, 28, 28, 1) -> (final logits (N, K), [probe logits (N, K)])."""
    masked, probe_logits = self.cifs(
      jax.nn.relu(self.conv(x)), labels=labels, train=train
    )
    return self.head(jnp.mean(masked, axis=(1, 2))), [probe_logits]


def test_probe_gradient_through_the_mask_matches_linen(batch):
  """The final head's loss reaches the probe only through the mask."""
  x, y = batch
  cifs = models.CIFS(
    NUM_CLASSES,
    probe="mlp",
    mlp_hidden=8,
    options=models.CIFSOptions(topk=2, relevance_grad="stop"),
  )
  features = jnp.zeros((1, 28, 28, 6))
  model = MaskedClassifier(cifs, features, nnx.Rngs(0))

  def final_head_loss(model):
    logits, _ = model(x, labels=y, train=True)
    return jnp.mean(losses.cross_entropy_per_example(logits, y))

  probe_gradient = nnx.jit(nnx.grad(final_head_loss))(model)["cifs"]["probe"]

  cifs_params = nnx_bridge.linen_variables(model.cifs)["params"]

  def linen_final_head_loss(params):
    masked, _ = cifs.apply(
      {"params": params}, jax.nn.relu(model.conv(x)), labels=y, train=True
    )
    logits = model.head(jnp.mean(masked, axis=(1, 2)))
    return jnp.mean(losses.cross_entropy_per_example(logits, y))

  linen_gradient = jax.jit(jax.grad(linen_final_head_loss))(cifs_params)
  linen_gradient = linen_gradient["probe"]
  chex.assert_trees_all_close(
    nnx.to_pure_dict(probe_gradient), linen_gradient, **TOLERANCE
  )
  assert optax.tree.norm(linen_gradient) > 1e-3


# ~27 s: the gradient tests above cover the NNX port in the default run.
@pytest.mark.slow
def test_pgd_adversarial_training_step_matches_linen(backbone, batch):
  linen_model, variables = backbone
  x, y = batch
  key = jax.random.key(7)
  tx = optax.sgd(0.1, momentum=0.9)

  model = nnx_bridge.from_linen(linen_model, variables, x)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y, key):
    x_adv = attacks.pgd(lambda v: model(v), x, y, key, ATTACK_LOSS, PGD)

    def training_loss(model):
      logits, probe_logits = model(
        x_adv, train=True, labels=y, mutable=["batch_stats"]
      )
      return jnp.mean(losses.joint_loss_per_example(logits, probe_logits, y))

    loss, grads = nnx.value_and_grad(training_loss)(model)
    optimizer.update(model, grads)
    return x_adv, loss, grads

  x_adv, loss, grads = nnx_step(model, optimizer, x, y, key)

  @jax.jit
  def linen_step(variables, x, y, key):
    logits_fn = lambda v: linen_model.apply(variables, v)
    x_adv = attacks.pgd(logits_fn, x, y, key, ATTACK_LOSS, PGD)

    def training_loss(params):
      (logits, probe_logits), updates = linen_model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x_adv,
        train=True,
        labels=y,
        mutable=["batch_stats"],
      )
      loss = jnp.mean(losses.joint_loss_per_example(logits, probe_logits, y))
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(
      training_loss, has_aux=True
    )(variables["params"])
    sgd_updates, _ = tx.update(grads, tx.init(variables["params"]))
    params = optax.apply_updates(variables["params"], sgd_updates)
    new_variables = {"params": params, "batch_stats": batch_stats}
    return x_adv, loss, grads, new_variables

  linen_x_adv, linen_loss, linen_grads, linen_variables = linen_step(
    variables, x, y, key
  )
  chex.assert_trees_all_close(x_adv, linen_x_adv, **TOLERANCE)
  chex.assert_trees_all_close(loss, linen_loss, **TOLERANCE)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads), linen_grads, **TOLERANCE)
  chex.assert_trees_all_close(
    nnx_bridge.linen_variables(model), linen_variables, **TOLERANCE
  )
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(x_adv, x)
