"""Fashion-MNIST ResNet-10 at the larger budget of docs/results.md's
verdict (``docs/results_runs/run_all.sh``): about 45 minutes of a quiet
2-core CPU per model.

``fmnist_resnet10_cpu.py`` on all 60,000 training images for 9 epochs (one
process on both cores took 293 s an epoch), with the reference schedule's
milestones (epochs 75 and 90 of 120) scaled to 9 epochs: the learning rate
0.1, then 0.01 from epoch 7 and 0.001 from epoch 8 (0-based milestones 6
and 7). The per-epoch check on the first 500 test images; at the end
natural and PGD-20 accuracy on all 10,000, written to metrics.jsonl as
``final_check/*``. The adaptive sweep is off, as in the CPU config: run
``python -m cifs_jax.evaluate`` for it. Variants as in
``cifar_resnet18.py``, applied after these settings.
"""

from cifs_jax import experiment_config

fmnist_resnet10_cpu = experiment_config.sibling_config_file(
  __file__, "fmnist_resnet10_cpu"
)


def settings():
  """This file's config before variants."""
  config = fmnist_resnet10_cpu.settings()
  config.train.max_examples = -1
  config.train.epochs = 9
  config.train.lr_milestones = (6, 7)
  config.eval.final_num_examples = -1
  config.train.log_every_steps = 50
  return config


get_config = experiment_config.config_file(settings)
