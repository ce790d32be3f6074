"""Fashion-MNIST ResNet-10 at docs/results.md's smaller budget: one CPU.

``fmnist_resnet10.py`` narrowed to fit about ten minutes of a 2-core CPU per
model: width 16 (the standard 64 / 4), the first 10,000 training images,
2 epochs with the learning rate divided by 10 after epoch 1, the per-epoch
check on the first 500 test images and the final natural and PGD-20
accuracy on the first 5,000. The paper protocol's adaptive sweep is off
(``eval.final = False``): 4 attacks x 9 beta_atk targets take over 20
minutes on 300 images here. Run it separately with ``python -m
cifs_jax.evaluate`` on as many images as the budget allows (docs/results.md),
or turn it on with ``--config.eval.final=True``. Everything else (PGD-AT
with eps 0.1, step 0.01, 10 steps; SGD; CIFS placement) is
``fmnist_resnet10.py``'s. Variants as in ``cifar_resnet18.py``, applied
after these settings.
"""

from cifs_jax import experiment_config

fmnist_resnet10 = experiment_config.sibling_config_file(
  __file__, "fmnist_resnet10"
)


def settings():
  """This file's config before variants."""
  config = fmnist_resnet10.settings()
  config.model.width = 16
  config.train.max_examples = 10_000
  config.train.epochs = 2
  config.train.lr_milestones = (1,)
  config.eval.num_examples = 500
  config.eval.final = False
  config.eval.final_num_examples = 5_000
  config.train.log_every_steps = 20
  return config


get_config = experiment_config.config_file(settings)
